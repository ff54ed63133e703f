//! `[cluster]`: a replica of a replicated coordinator, its state in a
//! PostgreSQL store shared with the other replicas (`fedrec serve --store`).

use serde::{Deserialize, Serialize};

use super::*;
use crate::CoordinatorError;

/// Default `cluster.task`.
pub const DEFAULT_TASK: &str = "fedrec";

/// `[cluster]`: unset `store` (the default) runs one coordinator with its
/// checkpoint file; set, this process is one replica of a coordinator whose
/// state is in the store, with every other replica of the same `task`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// The store: `postgres://user:password@host:port/database`. Default:
    /// none (a single coordinator).
    pub store: Option<String>,
    /// The task: replicas of the same task in the same store form one
    /// coordinator. Default [`DEFAULT_TASK`].
    pub task: String,
    /// This replica's name, unique among the task's replicas. Default: the
    /// listen address.
    pub replica: Option<String>,
    /// The URL devices use to reach this replica (recorded in the store for
    /// operators). Default: `http://` or `https://` and the listen address.
    pub url: Option<String>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            store: None,
            task: DEFAULT_TASK.to_owned(),
            replica: None,
            url: None,
        }
    }
}

impl ClusterConfig {
    /// Whether this process is a replica.
    pub fn enabled(&self) -> bool {
        self.store.is_some()
    }
}

impl CoordinatorConfig {
    /// What a replicated coordinator cannot run yet, and why.
    pub(super) fn validate_cluster(&self) -> Result<(), CoordinatorError> {
        if !self.cluster.enabled() {
            return Ok(());
        }
        if self.cluster.task.trim().is_empty() {
            return Err(invalid("cluster.task must not be empty".to_owned()));
        }
        let refused = if self.rounds.mode == RoundsMode::Async {
            Some("rounds.mode = \"async\": replicas combine rounds; use mode = \"sync\"")
        } else if self.model.preset == Some(ModelPreset::Auto) {
            Some(
                "model.preset = \"auto\": the settings search runs in one coordinator; choose \
                 the settings there (or by hand) and give them to the replicas",
            )
        } else if self.strategy.aggregation != Aggregation::Mean {
            Some(
                "a robust strategy.aggregation: replicas combine partial sums, which only the \
                 mean can; use \"mean\" with strategy.norm_bound against outliers",
            )
        } else {
            None
        };
        match refused {
            Some(why) => Err(invalid(format!(
                "a replicated coordinator ([cluster] store) refuses {why}"
            ))),
            None => Ok(()),
        }
    }
}
