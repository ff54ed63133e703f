//! The coordinator's configuration, loaded from a TOML file.
//!
//! Every option has a default (a named constant below), so an empty file is a
//! valid configuration. Unknown keys are rejected, so that a typo does not
//! silently fall back to a default.
//!
//! ```
//! use fedrec_coordinator::config::{CoordinatorConfig, StrategyName};
//! let config = CoordinatorConfig::from_toml_str(
//!     r#"
//!     [rounds]
//!     rounds = 20
//!     clients_per_round = 50
//!     over_selection = 1.3
//!     seed = 7
//!
//!     [strategy]
//!     name = "fedadam"
//!     server_lr = 0.01
//!     "#,
//! )
//! .unwrap();
//! assert_eq!(config.rounds.clients_per_round, 50);
//! assert_eq!(config.strategy.name, StrategyName::FedAdam);
//! assert_eq!(config.training.local_epochs, 5); // a default
//! ```

use std::path::Path;
use std::time::Duration;

use fedrec_proto::codec::Encoding;
use fedrec_proto::limits::Number;
use serde::{Deserialize, Serialize};

use crate::CoordinatorError;

mod auth;
mod cluster;
mod model;
mod privacy;
mod rounds;
mod search;
mod secure_aggregation;
mod server;
mod strategy;
mod training;
mod transport;

pub use auth::*;
pub use cluster::*;
pub use model::*;
pub use privacy::*;
pub use rounds::*;
pub use search::*;
pub use secure_aggregation::*;
pub use server::*;
pub use strategy::*;
pub use training::*;
pub use transport::*;

/// The whole configuration: one struct per TOML section.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// `[server]`: network and resource limits.
    pub server: ServerConfig,
    /// `[rounds]`: how rounds are formed and ended.
    pub rounds: RoundsConfig,
    /// `[training]`: hyperparameters sent to devices with each task.
    pub training: TrainingConfig,
    /// `[strategy]`: the server optimizer.
    pub strategy: StrategyConfig,
    /// `[model]`: how the CLI builds the initial model (not used by the core).
    pub model: ModelConfig,
    /// `[secure_aggregation]`: whether training rounds hide each device's
    /// update from the coordinator, and how.
    pub secure_aggregation: SecureAggregationConfig,
    /// `[privacy]`: user-level differential privacy (DP-FedAvg) and its
    /// budget.
    pub privacy: PrivacyConfig,
    /// `[tls]`: transport security of the listener (TLS, and mutual TLS
    /// with `client_ca`). Default: off (plain text).
    pub tls: TlsConfig,
    /// `[auth]`: enrollment tokens that devices exchange for short-lived
    /// sessions. Default: off (any device may join).
    pub auth: AuthConfig,
    /// `[download]`: how the model travels to devices.
    pub download: DownloadConfig,
    /// `[upload]`: how devices send their updates in plain rounds.
    pub upload: UploadConfig,
    /// `[search]`: what `[model] preset = "auto"` tries, and its budget
    /// (read by the CLI, not the core).
    pub search: SearchConfig,
    /// `[cluster]`: a replica of a replicated coordinator sharing a
    /// PostgreSQL store (read by the CLI). Default: off.
    pub cluster: ClusterConfig,
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX)
}

fn invalid(message: String) -> CoordinatorError {
    CoordinatorError::InvalidConfig(message)
}

/// Checks that `value` is finite and within `[lo, hi]` (or `(lo, hi]` when `open_lo`).
fn check_range(
    name: &str,
    value: f64,
    lo: f64,
    open_lo: bool,
    hi: f64,
) -> Result<(), CoordinatorError> {
    let ok_lo = if open_lo { value > lo } else { value >= lo };
    if value.is_finite() && ok_lo && value <= hi {
        return Ok(());
    }
    let (lo, hi, value) = (Number(lo), Number(hi), Number(value));
    let lo_text = if open_lo {
        format!("> {lo}")
    } else {
        format!(">= {lo}")
    };
    let text = if hi.0.is_finite() {
        format!("{name} must be {lo_text} and <= {hi}, got {value}")
    } else {
        format!("{name} must be finite and {lo_text}, got {value}")
    };
    Err(invalid(text))
}

fn config_file_error(path: &Path, message: impl ToString) -> CoordinatorError {
    CoordinatorError::ConfigFile {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

/// Longest time accepted for the `*_secs` options (one year), so that
/// deadlines never overflow an `Instant`.
const MAX_SECS: f64 = 365.0 * 24.0 * 3600.0;

/// A configuration that passed every check of [`CoordinatorConfig::validated`]:
/// the only form the coordinator starts from ([`RoundCore::new`],
/// [`bootstrap::prepare`]), so it is checked once, where it is loaded or
/// built, and read-only afterwards. It reads as the configuration it holds;
/// [`ValidConfig::into_inner`] gives that back to change and validate again.
///
/// [`RoundCore::new`]: crate::RoundCore::new
/// [`bootstrap::prepare`]: crate::bootstrap::prepare
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(transparent)]
pub struct ValidConfig(CoordinatorConfig);

impl ValidConfig {
    /// The configuration, to change (and validate again).
    pub fn into_inner(self) -> CoordinatorConfig {
        self.0
    }
}

/// The defaults, which are valid (tested).
impl Default for ValidConfig {
    fn default() -> Self {
        Self(CoordinatorConfig::default())
    }
}

impl std::ops::Deref for ValidConfig {
    type Target = CoordinatorConfig;

    fn deref(&self) -> &CoordinatorConfig {
        &self.0
    }
}

impl PartialEq<CoordinatorConfig> for ValidConfig {
    fn eq(&self, other: &CoordinatorConfig) -> bool {
        &self.0 == other
    }
}

impl TryFrom<CoordinatorConfig> for ValidConfig {
    type Error = CoordinatorError;

    fn try_from(config: CoordinatorConfig) -> Result<Self, CoordinatorError> {
        config.validated()
    }
}

impl CoordinatorConfig {
    /// Parses and validates a configuration from TOML text.
    pub fn from_toml_str(text: &str) -> Result<ValidConfig, CoordinatorError> {
        let config: Self = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        config.validated()
    }

    /// Reads, parses and validates a configuration file; errors name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<ValidConfig, CoordinatorError> {
        let path = path.as_ref();
        Self::parse_file(path)?.validated_from(Some(path))
    }

    /// Reads and parses a configuration file without validating it, for a
    /// caller that changes it first (a command line's options) and then
    /// calls [`validated_from`](Self::validated_from) once.
    pub fn parse_file(path: impl AsRef<Path>) -> Result<Self, CoordinatorError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| config_file_error(path, e))?;
        toml::from_str(&text).map_err(|e| config_file_error(path, e))
    }

    /// Checks every option's range, section by section, then what one
    /// section requires of another; the first problem found is reported.
    pub fn validated(self) -> Result<ValidConfig, CoordinatorError> {
        self.validate()?;
        Ok(ValidConfig(self))
    }

    /// [`validated`](Self::validated), with a problem reported as one of
    /// `file`, where the configuration was read from (if it was).
    pub fn validated_from(self, file: Option<&Path>) -> Result<ValidConfig, CoordinatorError> {
        self.validated().map_err(|e| match (e, file) {
            (CoordinatorError::InvalidConfig(message), Some(path)) => {
                config_file_error(path, message)
            }
            (other, _) => other,
        })
    }

    /// The configuration as TOML text (every option, defaults included).
    pub fn to_toml_string(&self) -> Result<String, CoordinatorError> {
        toml::to_string(self).map_err(|e| invalid(e.to_string()))
    }

    fn validate(&self) -> Result<(), CoordinatorError> {
        self.tls.validate()?;
        self.auth.validate()?;
        self.server.validate()?;
        self.validate_sessions()?;
        self.rounds.validate()?;
        self.training.validate()?;
        self.strategy.validate()?;
        self.validate_strategy()?;
        self.model.validate()?;
        self.validate_secure_aggregation()?;
        self.validate_privacy()?;
        self.validate_async()?;
        self.validate_cluster()?;
        if self.privacy.enabled() && self.rounds.rest_secs > 0.0 {
            return Err(invalid(
                "rounds.rest_secs > 0 cannot be used with differential privacy: the accountant's \
                 ε assumes every device is sampled independently for each round (Poisson \
                 sampling), and a resting device is left out because it took part before; set \
                 rounds.rest_secs = 0"
                    .to_owned(),
            ));
        }
        self.validate_search()
    }

    /// What the settings search needs: a budget that fits the devices'
    /// bounds, rounds, and no privacy guarantee to spend.
    fn validate_search(&self) -> Result<(), CoordinatorError> {
        self.search.validate(&self.training)?;
        if self.model.preset != Some(ModelPreset::Auto) {
            return Ok(());
        }
        if self.privacy.enabled() {
            return Err(invalid(
                "model.preset = \"auto\" is refused under differential privacy: each of its \
                 trials would spend privacy budget, and the accountant counts only the final \
                 run; choose the settings by hand"
                    .to_owned(),
            ));
        }
        if self.rounds.mode == RoundsMode::Async {
            return Err(invalid(
                "model.preset = \"auto\" trains the ALS recipe, whose server step needs \
                 synchronous rounds; use rounds.mode = \"sync\""
                    .to_owned(),
            ));
        }
        Ok(())
    }

    /// What asynchronous buffered aggregation cannot combine with, and why.
    fn validate_async(&self) -> Result<(), CoordinatorError> {
        if self.rounds.mode != RoundsMode::Async {
            return Ok(());
        }
        let refused = if self.secure_aggregation.enabled {
            Some(
                "secure aggregation: its masks cancel only within a cohort that starts together, \
                 and async devices start and finish one by one; use mode = \"sync\" with \
                 [secure_aggregation]",
            )
        } else if self.privacy.enabled() {
            Some(
                "differential privacy: the accountant's ε assumes every device is sampled \
                 independently for each round (Poisson sampling), which async check-ins are \
                 not; rather than print a wrong ε, use mode = \"sync\" with [privacy]",
            )
        } else if self.strategy.name == StrategyName::Ease {
            Some(
                "strategy.name = \"ease\": its step solves the sum of every device's \
                 co-purchases at once; use \"als\", \"fedavg\" (FedBuff's server step) or an \
                 adaptive step",
            )
        } else if self.strategy.aggregation != Aggregation::Mean {
            Some(
                "a robust strategy.aggregation: it needs a round's updates side by side; use \
                 \"mean\" with strategy.norm_bound against outliers",
            )
        } else {
            None
        };
        match refused {
            Some(why) => Err(invalid(format!(
                "rounds.mode = \"async\" does not work with {why}"
            ))),
            None => Ok(()),
        }
    }

    /// A session outlasts a long poll.
    fn validate_sessions(&self) -> Result<(), CoordinatorError> {
        let s = &self.server;
        let shortest = s.long_poll_secs + SESSION_MARGIN_SECS;
        if self.auth.session_ttl_secs < shortest {
            return Err(invalid(format!(
                "auth.session_ttl_secs must be at least server.long_poll_secs + {} = {}, got {}: \
                 a shorter session can end in the middle of a check-in",
                Number(SESSION_MARGIN_SECS),
                Number(shortest),
                Number(self.auth.session_ttl_secs)
            )));
        }

        Ok(())
    }

    /// What the server step needs of the loss, the rounds, secure
    /// aggregation and privacy.
    fn validate_strategy(&self) -> Result<(), CoordinatorError> {
        let st = &self.strategy;
        let t = &self.training;
        if st.aggregation != Aggregation::Mean
            && (self.secure_aggregation.enabled || self.privacy.enabled())
        {
            return Err(invalid(format!(
                "strategy.aggregation = {:?} needs every update on its own, so it works \
                 neither with secure aggregation nor with differential privacy; use \
                 \"mean\" there (devices bound their norms under [privacy])",
                st.aggregation
            )));
        }
        if st.name == StrategyName::Als {
            if t.loss != Loss::Als {
                return Err(invalid(
                    "strategy.name = \"als\" preconditions by the ALS loss's curvature, so it needs \
                     training.loss = \"als\""
                        .to_owned(),
                ));
            }
            if self.privacy.enabled() {
                return Err(invalid(
                    "strategy.name = \"als\" does not work with differential privacy: each device \
                     appends its x xᵀ to its update, and clipping the update for privacy would \
                     distort it; use \"fedadam\" under [privacy]"
                        .to_owned(),
                ));
            }
            if st.aggregation != Aggregation::Mean {
                return Err(invalid(format!(
                    "strategy.name = \"als\" needs the mean of the devices' x xᵀ, which \
                     strategy.aggregation = {:?} does not give (a coordinate-wise rule can make \
                     it indefinite); use \"mean\" with strategy.norm_bound against outliers",
                    st.aggregation
                )));
            }
        }
        if st.name == StrategyName::Ease {
            let conflict = if st.weighting != Weighting::Uniform {
                Some(
                    "strategy.weighting = \"uniform\" (a weighted mean is not the sum of the co-purchases)",
                )
            } else if st.aggregation != Aggregation::Mean || st.norm_bound.is_some() {
                Some(
                    "strategy.aggregation = \"mean\" without strategy.norm_bound (either would change the counts)",
                )
            } else if self.privacy.enabled() {
                Some("[privacy] off (clipping a device's co-purchases is not implemented for it)")
            } else {
                None
            };
            if let Some(need) = conflict {
                return Err(invalid(format!(
                    "strategy.name = \"ease\" sums the devices' co-purchase counts, so it needs {need}"
                )));
            }
            if !(st.ease_lambda > 0.0 && st.ease_lambda.is_finite()) {
                return Err(invalid(format!(
                    "strategy.ease_lambda must be a positive number, got {}",
                    st.ease_lambda
                )));
            }
        }
        if st.schedule == Schedule::Cosine && self.rounds.rounds == 0 {
            return Err(invalid(
                "strategy.schedule = \"cosine\" decays over rounds.rounds, which must then be finite (not 0)"
                    .to_owned(),
            ));
        }

        Ok(())
    }

    /// What differential privacy needs of the strategy and of secure
    /// aggregation.
    fn validate_privacy(&self) -> Result<(), CoordinatorError> {
        let p = &self.privacy;
        p.validate()?;
        if !p.enabled() {
            return Ok(());
        }
        let Some(q) = p.sampling_rate else {
            return Err(invalid(format!(
                "privacy.mode = \"{}\" needs privacy.sampling_rate, the probability that a \
                 device is sampled into a round (the accountant's q)",
                p.mode
            )));
        };
        check_range("privacy.sampling_rate", q, 0.0, true, 1.0)?;
        if self.strategy.weighting != Weighting::Uniform {
            return Err(invalid(
                "privacy.mode bounds every device's contribution, so it needs \
                 strategy.weighting = \"uniform\""
                    .to_owned(),
            ));
        }
        if p.mode == DpMode::Distributed && !self.secure_aggregation.enabled {
            return Err(invalid(
                "privacy.mode = \"distributed\" needs secure_aggregation.enabled = true: \
                 without it the coordinator sees each device's noisy update"
                    .to_owned(),
            ));
        }
        Ok(())
    }

    /// What secure aggregation needs of the uploads and the cohort.
    fn validate_secure_aggregation(&self) -> Result<(), CoordinatorError> {
        let sa = &self.secure_aggregation;
        sa.validate()?;
        if !sa.enabled {
            return Ok(());
        }
        if self.upload.encoding != Encoding::F32 {
            return Err(invalid(format!(
                "upload.encoding = \"{}\" cannot be used with secure_aggregation.enabled: \
                 secure aggregation quantizes masked inputs itself (secure_aggregation.bits); \
                 set upload.encoding = \"f32\"",
                self.upload.encoding
            )));
        }
        let max = fedrec_proto::secagg::Quantizer::new(sa.range, sa.bits)
            .map_err(|e| invalid(format!("secure_aggregation: {e}")))?
            .max_summands();
        let r = &self.rounds;
        let selected = ((r.clients_per_round as f64) * r.over_selection).ceil();
        if r.fraction.is_none() && selected > max as f64 {
            return Err(invalid(format!(
                "secure_aggregation: a cohort of {selected} devices (rounds.clients_per_round × \
                 rounds.over_selection) could overflow the sum of {}-bit values, which holds at \
                 most {max}; lower secure_aggregation.bits or the cohort",
                sa.bits
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
