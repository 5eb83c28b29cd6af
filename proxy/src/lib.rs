//! The mirror-gateway server: config, routing, cache and origins, on Pingora.
//!
//! [`config::load`] reads and validates a config file; [`app::App::build`] turns it into a
//! Pingora server with the proxy service ([`gateway::Gateway`]) and one in-process file server
//! per export-tree origin; [`app::App::run`] serves until a signal stops it.

#![deny(unsafe_code)] // allowed only in `cork`, for one socket option

pub mod access_log;
pub mod admin;
pub mod app;
pub mod cache;
pub mod client_ip;
pub mod config;
pub mod cork;
pub mod gateway;
pub mod host;
pub mod logging;
pub mod metrics;
pub mod origin;
pub mod path;
pub mod pid_file;
pub mod proxy_protocol;
pub mod readiness;
pub mod reload;
mod respond;
pub mod routing;
pub mod status;
pub mod sync_service;
pub mod tls;
pub mod upstream;
