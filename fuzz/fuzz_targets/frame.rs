#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rocketmesh::remoting::fuzzing::frame_stream(data));
