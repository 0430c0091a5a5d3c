//! keybroker mints short-lived object-storage keys from a provider's API, caches them, renews
//! them before they expire, serves them over a Unix socket in the AWS `credential_process`
//! format, and revokes them when it stops.
//!
//! Components, in the order a request meets them:
//! - [`server`]: HTTP/1.1 (hyper on tokio) on the Unix socket and the container endpoint;
//!   counts and bounds connections, checks the peer's uid/gid, routes the request. A ready key
//!   is answered from its pre-rendered bytes without waiting.
//! - [`broker`]: one slot per profile holding the current key with its response pre-rendered;
//!   a background driver per slot mints, renews (single flight) and revokes.
//! - [`provider`]: the upstream APIs (CoreWeave, Crusoe, GleSYS, dev) behind one trait, the
//!   HTTPS client, and the pacer each endpoint's calls share.
//! - [`credentials`]: the secret type and the JSON formats served.
//!
//! Around them: [`config`] (TOML, validated with file positions), [`daemon`] (start-up and the
//! ordered shutdown), [`client`] (the `credential-process` side, std only), [`cli`], [`clock`]
//! (injectable time for paused-clock tests), [`files`] (directories made with explicit modes),
//! [`logging`], [`users`], [`s3`] (what clients need to reach each profile's S3 service) and
//! [`node`] (`install-node`: the directory a node's workloads share with its daemon).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod broker;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod credentials;
pub mod daemon;
pub mod files;
pub mod ledger;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod paths;
pub mod provider;
pub mod recovery;
pub mod s3;
pub mod server;
pub mod systemd;
pub mod users;
