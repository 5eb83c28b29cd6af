//! Origins at run time: how the gateway reaches each configured origin.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType, Result};

use crate::config::{HttpOrigin, Origin, OriginKind};
use crate::origin::export_tree::ExportTree;

/// `Host` header sent to the internal export-tree server.
const EXPORT_TREE_HOST: &str = "export-tree.internal";
/// Seconds a pooled connection to the file server may stay idle. Shorter than the file
/// server's keep-alive, so the pool never reuses a connection the server is closing, which
/// Pingora reports as an error ("failed to acquire reusable stream").
const EXPORT_TREE_IDLE_SECS: u64 = 30;
const _: () = assert!(EXPORT_TREE_IDLE_SECS < crate::origin::file_server::KEEPALIVE_SECS);

/// A configured origin, ready to hand out peers.
pub enum Upstream {
    /// Web services over HTTP/1.1 with keep-alive, tried in turn.
    Http {
        addresses: Vec<SocketAddr>,
        settings: HttpOrigin,
        /// Round-robin position for the first attempt of each request.
        next: AtomicUsize,
    },
    /// An export tree, served by the in-process file server on a Unix socket.
    ExportTree {
        tree: Arc<ExportTree>,
        socket: PathBuf,
    },
}

impl Upstream {
    /// Prepares `origin`; export-tree origins get a socket path under `runtime_dir`.
    pub fn new(
        domain: &str,
        origin: &Origin,
        runtime_dir: &std::path::Path,
    ) -> Result<Self, String> {
        match &origin.kind {
            OriginKind::Http(settings) => {
                let mut addresses = Vec::new();
                for address in &settings.addresses {
                    let resolved = address
                        .to_socket_addrs()
                        .map_err(|e| format!("cannot resolve origin address {address:?}: {e}"))?;
                    addresses.extend(resolved.take(1));
                }
                Ok(Self::Http {
                    addresses,
                    settings: settings.clone(),
                    next: AtomicUsize::new(0),
                })
            }
            OriginKind::ExportTree(settings) => {
                let tree = ExportTree::new(settings.root.clone(), settings.pinned_export.clone())
                    .map_err(|e| e.to_string())?;
                let socket = runtime_dir.join(format!("{domain}.{}.sock", origin.name));
                Ok(Self::ExportTree {
                    tree: Arc::new(tree),
                    socket,
                })
            }
        }
    }

    /// Returns the number of distinct peers, which bounds connection retries.
    pub fn peer_count(&self) -> usize {
        match self {
            Self::Http { addresses, .. } => addresses.len(),
            Self::ExportTree { .. } => 1,
        }
    }

    /// Picks the round-robin start for a new request.
    pub fn first_attempt(&self) -> usize {
        match self {
            Self::Http { next, .. } => next.fetch_add(1, Ordering::Relaxed),
            Self::ExportTree { .. } => 0,
        }
    }

    /// Builds the peer for attempt number `attempt` of a request that started at `start`.
    pub fn peer(&self, start: usize, attempt: usize) -> Result<Box<HttpPeer>> {
        match self {
            Self::Http {
                addresses,
                settings,
                ..
            } => {
                let address = addresses[(start + attempt) % addresses.len()];
                let mut peer = HttpPeer::new(address, false, String::new());
                peer.options.connection_timeout = Some(settings.connect_timeout);
                peer.options.read_timeout = Some(settings.read_timeout);
                peer.options.write_timeout = Some(settings.write_timeout);
                peer.options.idle_timeout = Some(settings.idle_timeout);
                Ok(Box::new(peer))
            }
            Self::ExportTree { socket, .. } => {
                let path = socket.to_str().ok_or_else(|| {
                    Error::explain(ErrorType::InternalError, "socket path is not UTF-8")
                })?;
                let mut peer = HttpPeer::new_uds(path, false, String::new())?;
                peer.options.idle_timeout =
                    Some(std::time::Duration::from_secs(EXPORT_TREE_IDLE_SECS));
                Ok(Box::new(peer))
            }
        }
    }

    /// Returns the `Host` header value the origin expects.
    pub fn host(&self) -> &str {
        match self {
            Self::Http { settings, .. } => &settings.host,
            Self::ExportTree { .. } => EXPORT_TREE_HOST,
        }
    }

    /// Returns the export tree, for export-tree origins.
    pub fn export_tree(&self) -> Option<&Arc<ExportTree>> {
        match self {
            Self::ExportTree { tree, .. } => Some(tree),
            Self::Http { .. } => None,
        }
    }
}
