pub mod admin;
pub mod balance;
pub mod broker;
pub mod client_registry;
pub mod log_throttle;
pub mod names;
pub mod proxy;
pub mod remoting;
