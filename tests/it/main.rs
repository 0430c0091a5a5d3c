//! keybroker's integration tests: one binary (one link step for the whole suite), modules by subject.

mod broker_time;
mod client_setup;
mod config_errors;
mod connections;
mod daemon;
mod e2e;
mod fake_cloud;
mod harness;
mod kubernetes;
mod layout;
mod moto;
mod operator;
mod promise;
mod recovery;
mod scale;
mod shipped;
mod socket_trust;
mod state_files;
mod systemd;
mod wif;
