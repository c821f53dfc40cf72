//! One listener per upstream broker name, so that a client which names its broker only by the
//! address it dials (no `bname`: Java 4, the C++ client and everything built on it, ali-ons) still
//! reaches that broker. Route data advertises each broker name at its own listener; a connection
//! accepted there carries the broker name as its identity.
//!
//! Listeners follow the route table: a broker name that appears gets one before the table that
//! names it is installed; one that leaves stops accepting, and its connections answer what they
//! carry and close, so clients refresh their routes. A name that comes back gets its old port
//! again when it is free, since clients may still have the address cached.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::Proxy;
use super::config::{ConfigError, SidecarConfig};
use super::server::{Stop, accept};

/// Where the listeners bind and what they advertise.
#[derive(Debug, Clone)]
struct Placement {
    bind: IpAddr,
    advertised_host: String,
    ports: Option<RangeInclusive<u16>>,
}

struct Open {
    local: SocketAddr,
    retire: watch::Sender<bool>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct State {
    open: BTreeMap<String, Open>,
    /// The port each broker name had, reused when it comes back.
    remembered: HashMap<String, u16>,
    /// Accept loops of retired listeners, still answering their connections' last requests.
    draining: Vec<JoinHandle<()>>,
}

/// A broker name's listener, as the admin endpoint and tests see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerListener {
    pub broker_name: String,
    pub local: SocketAddr,
    pub advertised: Arc<str>,
}

pub struct BrokerListeners {
    /// `None` when turned off: every broker is advertised at the main listener.
    placement: Option<Placement>,
    state: Mutex<State>,
    /// broker name → advertised `host:port`, read by route synthesis on every route request.
    advertised: ArcSwap<HashMap<String, Arc<str>>>,
}

/// The host part of `host:port` (IPv6 hosts keep their brackets).
fn host_of(address: &str) -> &str {
    address.rsplit_once(':').map_or(address, |(host, _)| host)
}

impl BrokerListeners {
    /// Placed beside the main listener bound at `main_local` and advertised as `main_advertised`.
    pub fn new(
        config: &SidecarConfig,
        main_local: SocketAddr,
        main_advertised: &str,
    ) -> Result<Self, ConfigError> {
        let settings = &config.broker_listeners;
        let placement = settings.enabled.then(|| -> Result<Placement, ConfigError> {
            Ok(Placement {
                bind: settings.address.unwrap_or(main_local.ip()),
                advertised_host: settings
                    .advertised_host
                    .clone()
                    .unwrap_or_else(|| host_of(main_advertised).to_owned()),
                ports: settings.ports()?,
            })
        });
        Ok(Self {
            placement: placement.transpose()?,
            state: Mutex::default(),
            advertised: ArcSwap::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// broker name → the address route data gives clients for it.
    pub fn advertised(&self) -> Arc<HashMap<String, Arc<str>>> {
        self.advertised.load_full()
    }

    pub fn listening(&self) -> Vec<BrokerListener> {
        let advertised = self.advertised();
        self.lock()
            .open
            .iter()
            .map(|(name, open)| BrokerListener {
                broker_name: name.clone(),
                local: open.local,
                advertised: advertised
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| open.local.to_string().into()),
            })
            .collect()
    }

    /// Opens a listener for each of `names` that has none. A name whose listener cannot be bound
    /// stays advertised at the main listener (clients that send `bname` still reach it) and is
    /// logged; the next route change tries again.
    pub fn open<'a>(&self, proxy: &Arc<Proxy>, names: impl IntoIterator<Item = &'a str>) {
        let Some(placement) = &self.placement else {
            return;
        };
        let mut state = self.lock();
        let mut added = Vec::new();
        for name in names {
            if state.open.contains_key(name) {
                continue;
            }
            let listener = match bind(placement, &state, name) {
                Ok(listener) => listener,
                Err(error) => {
                    warn!(broker = name, %error, "no listener for the broker: it is advertised at the main address, and only clients that send bname reach it");
                    continue;
                }
            };
            let Ok(local) = listener.local_addr() else {
                continue;
            };
            let advertised: Arc<str> =
                format!("{}:{}", placement.advertised_host, local.port()).into();
            info!(broker = name, listen = %local, %advertised, "broker listener open");
            let (retire, retired) = watch::channel(false);
            let stop = Stop::new(proxy.shutdown.subscribe(), Some(retired));
            let task = tokio::spawn(accept(
                proxy.clone(),
                listener,
                advertised.clone(),
                Some(Arc::from(name)),
                stop,
            ));
            state.remembered.insert(name.to_owned(), local.port());
            state.open.insert(
                name.to_owned(),
                Open {
                    local,
                    retire,
                    task,
                },
            );
            added.push((name.to_owned(), advertised));
        }
        drop(state);
        if !added.is_empty() {
            let mut advertised = HashMap::clone(&self.advertised());
            advertised.extend(added);
            self.advertised.store(Arc::new(advertised));
        }
    }

    /// Retires the listeners of broker names not in `keep`: they stop accepting, and their
    /// connections close once they have answered what they carry.
    pub fn retain(&self, keep: &std::collections::HashSet<&str>) {
        let mut state = self.lock();
        let leaving: Vec<String> = state
            .open
            .keys()
            .filter(|name| !keep.contains(name.as_str()))
            .cloned()
            .collect();
        if leaving.is_empty() {
            return;
        }
        let mut advertised = HashMap::clone(&self.advertised());
        for name in leaving {
            advertised.remove(&name);
            if let Some(open) = state.open.remove(&name) {
                info!(broker = %name, listen = %open.local, "broker left the routes: its listener drains and closes");
                let _ = open.retire.send(true);
                state.draining.push(open.task);
            }
        }
        state.draining.retain(|task| !task.is_finished());
        self.advertised.store(Arc::new(advertised));
        drop(state);
    }

    /// Every accept loop, open or draining, for a shutdown to wait on.
    pub fn take_tasks(&self) -> Vec<JoinHandle<()>> {
        let mut state = self.lock();
        let open = std::mem::take(&mut state.open);
        let mut tasks = std::mem::take(&mut state.draining);
        tasks.extend(open.into_values().map(|open| open.task));
        tasks
    }
}

/// Binds a listener for `name`: its remembered port first, then the configured range (or a port
/// the OS picks).
fn bind(placement: &Placement, state: &State, name: &str) -> std::io::Result<TcpListener> {
    let in_use = |port: u16| state.open.values().any(|open| open.local.port() == port);
    let remembered = state
        .remembered
        .get(name)
        .copied()
        .filter(|port| !in_use(*port))
        .filter(|port| {
            placement
                .ports
                .as_ref()
                .is_none_or(|ports| ports.contains(port))
        });
    if let Some(port) = remembered
        && let Ok(listener) = bind_port(placement.bind, port)
    {
        return Ok(listener);
    }
    let Some(ports) = &placement.ports else {
        return bind_port(placement.bind, 0);
    };
    // Ports other names had are tried last, so a name that comes back finds its own free.
    let taken_before = |port: u16| state.remembered.values().any(|had| *had == port);
    let mut last_error = None;
    for pass in [false, true] {
        for port in ports.clone() {
            if in_use(port) || taken_before(port) != pass {
                continue;
            }
            match bind_port(placement.bind, port) {
                Ok(listener) => return Ok(listener),
                Err(error) => last_error = Some(error),
            }
        }
    }
    Err(last_error.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("every port of {}-{} is taken", ports.start(), ports.end()),
        )
    }))
}

fn bind_port(ip: IpAddr, port: u16) -> std::io::Result<TcpListener> {
    let listener = std::net::TcpListener::bind(SocketAddr::new(ip, port))?;
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|address| address.port())
            .expect("a free port")
    }

    #[tokio::test]
    async fn ports_come_from_the_range_and_a_returning_name_gets_its_own_back() {
        let port = free_port();
        let placement = Placement {
            bind: IpAddr::from([127, 0, 0, 1]),
            advertised_host: "127.0.0.1".into(),
            ports: Some(port..=port),
        };
        let mut state = State::default();
        let first = bind(&placement, &state, "a").expect("the range's port");
        assert_eq!(first.local_addr().expect("addr").port(), port);
        state.open.insert(
            "a".into(),
            Open {
                local: first.local_addr().expect("addr"),
                retire: watch::channel(false).0,
                task: tokio::spawn(async {}),
            },
        );
        state.remembered.insert("a".into(), port);
        assert!(
            bind(&placement, &state, "b").is_err(),
            "the range is used up"
        );
        // "a" leaves (its port is freed) and comes back.
        state.open.clear();
        drop(first);
        let again = bind(&placement, &state, "a").expect("rebind");
        assert_eq!(again.local_addr().expect("addr").port(), port);
    }

    #[test]
    fn hosts_are_split_from_ports() {
        assert_eq!(host_of("10.0.0.1:9876"), "10.0.0.1");
        assert_eq!(host_of("[::1]:9876"), "[::1]");
        assert_eq!(host_of("sidecar.local:9876"), "sidecar.local");
    }
}
