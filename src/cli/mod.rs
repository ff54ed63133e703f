//! The commands of `fedrec`, one module each; `main.rs` parses and dispatches.

pub(crate) mod args;
pub(crate) mod auto;
pub(crate) mod bench;
pub(crate) mod client;
pub(crate) mod data;
pub(crate) mod devices;
pub(crate) mod export;
pub(crate) mod security;
pub(crate) mod serve;
pub(crate) mod simulate;

pub(crate) use args::*;
pub(crate) use bench::*;
pub(crate) use client::*;
pub(crate) use data::*;
pub(crate) use devices::*;
pub(crate) use export::*;
pub(crate) use security::*;
pub(crate) use serve::*;
pub(crate) use simulate::*;
