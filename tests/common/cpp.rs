//! The Apache RocketMQ C++ client 2.x (PyPI `rocketmq==0.4.4`, which bundles `librocketmq`),
//! driven by `tests/cpp/client.py`. The binding is installed on first use into a virtual
//! environment under the build directory (`target/tmp/cpp-client-0.4.4`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const PACKAGE: &str = "rocketmq==0.4.4";

/// The virtual environment's python, installing the binding the first time.
pub fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let venv = root.join("cpp-client-0.4.4");
        let python = venv.join("bin").join("python");
        if python.exists() {
            return python;
        }
        // Built beside, then renamed into place: a half-made environment is never used.
        let building = root.join(format!("cpp-client-building-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&building);
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&building)
            .status()
            .expect("python3 is needed for the C++ client tests");
        assert!(status.success(), "python3 -m venv failed");
        let status = Command::new(building.join("bin").join("pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", PACKAGE])
            .status()
            .expect("pip");
        assert!(status.success(), "pip install {PACKAGE} failed");
        if std::fs::rename(&building, &venv).is_err() {
            // Another test process finished first; its environment is as good.
            let _ = std::fs::remove_dir_all(&building);
        }
        python
    })
}

pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cpp/client.py")
}
