pub mod broker;
pub mod remoting;
