pub mod remoting;
