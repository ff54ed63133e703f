//! A replica of a replicated coordinator (`fedrec serve --store URL`): the
//! loop that moves rounds between this replica's core and the store.
//!
//! Every replica, leader or not, every [`TICK`]:
//! 1. reports its waiting and joined devices (a heartbeat);
//! 2. under enrollment tokens, ends the sessions it holds that a newer join
//!    of their token replaced at another replica;
//! 3. follows the store's committed state when a round has ended there
//!    (model version, counters, history, the privacy accountant:
//!    [`RoundCore::follow`]);
//! 4. commits the partial sums of its closed shares (once each);
//! 5. opens its share of the open round, when the leader ordered one.
//!
//! The replica holding the task's leadership (a PostgreSQL advisory lock on
//! its connection, released when the connection ends) also:
//! 6. deletes ended sessions and silent replicas' rows, every
//!    [`SWEEP_EVERY`];
//! 7. ends the open round once every share is in, or [`GRACE`] after its
//!    deadline with the shares that are: the combined mean through the
//!    strategy, committed with [`Store::end_round`], which checks the round
//!    and the version it replaces, so a round is applied exactly once
//!    whichever leader ends it;
//! 8. plans and orders the next round from the replicas' heartbeats (under
//!    differential privacy counting it, with the order, in the store).
//!
//! A store error drops the connection (and with it any leadership) and the
//! loop tries again with back-off; devices keep being served meanwhile, and
//! rounds wait.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use fedrec_coordinator::CoordinatorError;
use fedrec_coordinator::round::cluster::{
    Followed, Plan, ReplicaLoad, RunCounters, ShareOrder, ShareSum,
};
use fedrec_coordinator::round::{Pseudonym, RoundCore, TaskKind};
use fedrec_coordinator::service::{NewSession, ServiceHandle, SessionStore, StoreFuture};
use fedrec_proto::Layout;
use fedrec_proto::catalogue::Catalogue;
use fedrec_store::{
    EndRound, NewModel, NewVersion, Partial, ReplicaBeat, RoundOrder, Share, Store, StoreError,
};

/// How often the loop looks at the store.
pub const TICK: Duration = Duration::from_millis(100);

/// How long after a round's deadline the leader waits for the replicas'
/// shares: a replica commits its share right after the deadline, so only a
/// lost replica's share is missing by then.
pub const GRACE: Duration = Duration::from_secs(2);

/// How often a replica reports its devices when their numbers do not
/// change (a change is reported at the next [`TICK`]).
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// How often the leader deletes ended sessions and silent replicas' rows.
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// A replica not heard from for this long has no share in the next round.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);

/// The longest wait between tries while the store is unreachable.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Who this replica is.
#[derive(Clone, Debug)]
pub struct Replica {
    /// The store's URL (it may hold a password: never printed).
    pub store: String,
    /// The task the replicas share.
    pub task: String,
    /// This replica's name.
    pub name: String,
    /// The URL devices use to reach it.
    pub url: String,
}

/// Connects to the store, checks the task's shape and catalogue (creating
/// the task, and its first model version from `params`, if it is new) and
/// reads the committed state this replica starts from.
pub async fn open(
    replica: &Replica,
    layout: &Layout,
    catalogue: &Catalogue,
    params: &[f32],
) -> anyhow::Result<Followed> {
    let mut store = Store::connect(&replica.store).await?;
    let place = format!("task {:?} in the store {}", replica.task, store.target());
    store
        .open_task(&replica.task, layout)
        .await
        .context(place.clone())?;
    store
        .check_catalogue(&replica.task, &catalogue.ids())
        .await
        .context(place)?;
    if store.latest(&replica.task).await?.is_none() {
        let first = NewVersion {
            previous: None,
            version: 1,
            params,
            m: &[],
            v: &[],
            summary: None,
            privacy: None,
        };
        match store.commit_version(&replica.task, &first).await {
            // Another replica wrote the first version meanwhile.
            Ok(()) | Err(StoreError::StaleVersion { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(committed(&store, &replica.task).await?)
}

/// The store's committed state of `task`.
async fn committed(store: &Store, task: &str) -> Result<Followed, StoreError> {
    let model = store
        .latest(task)
        .await?
        .ok_or_else(|| StoreError::Corrupt(format!("task {task:?} has no model version")))?;
    Ok(Followed {
        version: model.version,
        params: model.params,
        m: model.m,
        v: model.v,
        counters: store.run_state(task).await?.unwrap_or_default(),
        history: store.history(task).await?,
        privacy: store.privacy(task).await?,
    })
}

/// Sessions in the store, on a connection of their own (device requests
/// wait on it, never on the round loop's). Requests share it at once:
/// tokio-postgres pipelines them on the one connection.
#[derive(Debug)]
pub struct StoreSessions {
    replica: Replica,
    store: tokio::sync::Mutex<Option<Arc<Store>>>,
}

impl StoreSessions {
    /// Sessions of `replica`'s task, connecting when first needed.
    pub fn new(replica: Replica) -> Arc<Self> {
        Arc::new(Self {
            replica,
            store: tokio::sync::Mutex::new(None),
        })
    }

    /// Runs `f` on the connection (made if need be); an error drops it, so
    /// that the next call connects afresh.
    async fn with_store<T>(
        &self,
        f: impl AsyncFnOnce(&Store, &str) -> Result<T, StoreError>,
    ) -> Result<T, CoordinatorError> {
        let unavailable = |e: StoreError| CoordinatorError::StoreUnavailable(e.to_string());
        let store = {
            let mut slot = self.store.lock().await;
            match slot.as_ref() {
                Some(store) => Arc::clone(store),
                None => {
                    let store = Store::connect(&self.replica.store)
                        .await
                        .map_err(unavailable)?;
                    store.relax_commits().await.map_err(unavailable)?;
                    Arc::clone(slot.insert(Arc::new(store)))
                }
            }
        };
        let result = f(&store, &self.replica.task).await;
        if result.is_err() {
            let mut slot = self.store.lock().await;
            if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, &store)) {
                *slot = None;
            }
        }
        result.map_err(unavailable)
    }
}

impl SessionStore for StoreSessions {
    fn record(&self, session: NewSession) -> StoreFuture<'_, Vec<Pseudonym>> {
        Box::pin(self.with_store(async move |store, task| {
            let pseudonym = session.pseudonym.to_string();
            let token = session.token.as_ref().map(|(t, max)| (t.as_str(), *max));
            let ended = store
                .put_session(task, &pseudonym, token, session.ttl)
                .await?;
            Ok(ended.iter().filter_map(|p| p.parse().ok()).collect())
        }))
    }

    fn find(&self, pseudonym: Pseudonym) -> StoreFuture<'_, Option<Duration>> {
        Box::pin(self.with_store(async move |store, task| {
            let found = store.session(task, &pseudonym.to_string()).await?;
            // No expiry recorded (imported from a checkpoint): a full session.
            Ok(found.map(|left| left.unwrap_or(Duration::MAX)))
        }))
    }
}

/// The loop's state between ticks.
struct Driver {
    replica: Replica,
    handle: ServiceHandle,
    store: Option<Store>,
    /// The store's round counters as this core last followed them.
    followed: Option<RunCounters>,
    /// Closed shares not yet in the store.
    unsent: Vec<ShareSum>,
    /// As leader: when devices were first seen waiting with no round open.
    window_start: Option<Instant>,
    leading: bool,
    /// The last heartbeat: when, and the (waiting, joined) it reported.
    beat: Option<(Instant, (usize, usize))>,
    /// When sessions replaced elsewhere were last looked up (under
    /// enrollment tokens).
    replaced_seen: Option<Instant>,
    /// As leader: when the store was last swept.
    swept: Option<Instant>,
}

/// Runs the replica's loop until the process stops.
pub async fn run(replica: Replica, handle: ServiceHandle) {
    let mut driver = Driver {
        replica,
        handle,
        store: None,
        followed: None,
        unsent: Vec::new(),
        window_start: None,
        leading: false,
        beat: None,
        replaced_seen: None,
        swept: None,
    };
    let mut backoff = TICK;
    loop {
        let began = Instant::now();
        let stepped = driver.step().await;
        if began.elapsed() > Duration::from_secs(2) {
            tracing::warn!(
                seconds = began.elapsed().as_secs_f64(),
                "a slow step of the replica loop"
            );
        }
        match stepped {
            Ok(()) => backoff = TICK,
            Err(e) => {
                if driver.store.take().is_some() {
                    tracing::warn!(error = %e, "store unavailable; trying again with back-off");
                }
                if std::mem::take(&mut driver.leading) {
                    tracing::warn!("leadership lost with the store connection");
                }
                driver.followed = None;
                driver.beat = None;
                driver.replaced_seen = None;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        tokio::time::sleep(backoff).await;
    }
}

fn core_error(e: CoordinatorError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

impl Driver {
    fn with_core<R>(&self, f: impl FnOnce(&mut RoundCore) -> R) -> anyhow::Result<R> {
        self.handle.with_core(f).map_err(core_error)
    }

    async fn step(&mut self) -> anyhow::Result<()> {
        if self.store.is_none() {
            self.store = Some(Store::connect(&self.replica.store).await?);
            tracing::info!(replica = %self.replica.name, "connected to the store");
        }
        let task = self.replica.task.clone();
        self.heartbeat().await?;
        self.end_replaced().await?;
        self.follow().await?;
        self.send_sums().await?;
        let store = self.store.as_mut().expect("connected above");
        let order = store.open_order(&task).await?;
        if let Some(order) = &order
            && let Some(share) = order.shares.get(&self.replica.name)
        {
            let share = ShareOrder {
                round: order.round,
                kind: order.kind,
                model_version: order.model_version,
                take: share.take,
                needed: share.needed,
                deadline: instant_of(order.deadline),
                privacy: order.privacy.clone(),
            };
            self.with_core(|core| core.order_share(Instant::now(), share))?;
        }
        let store = self.store.as_mut().expect("connected above");
        if store.try_lead(&task).await? {
            if !self.leading {
                tracing::info!(replica = %self.replica.name, "leading the task");
                self.leading = true;
                // The accountant counted rounds ordered since this
                // replica last followed: lead from the store's state.
                self.followed = None;
                self.follow().await?;
            }
            self.sweep().await?;
            self.lead(order).await?;
        }
        Ok(())
    }

    /// Under enrollment tokens: ends the sessions held here that a newer
    /// join of their token replaced at another replica (the token's limit
    /// counts sessions at every replica).
    async fn end_replaced(&mut self) -> anyhow::Result<()> {
        let (tokens, ttl) = self.with_core(|core| {
            let auth = &core.config().auth;
            (auth.enrollment_tokens.is_some(), auth.session_ttl())
        })?;
        if !tokens {
            return Ok(());
        }
        // Look back past the last look (by a margin for commits that were
        // in flight), or over a whole session's life the first time.
        let within = self
            .replaced_seen
            .map_or(ttl, |at| at.elapsed() + Duration::from_secs(2));
        let looked = Instant::now();
        let store = self.store.as_ref().expect("connected");
        let ended: Vec<Pseudonym> = store
            .replaced_sessions(&self.replica.task, within)
            .await?
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect();
        if !ended.is_empty() {
            self.with_core(|core| core.end_replaced(&ended))?;
        }
        self.replaced_seen = Some(looked);
        Ok(())
    }

    /// As leader, every [`SWEEP_EVERY`]: deletes sessions ended a session's
    /// lifetime ago and the rows of replicas silent as long.
    async fn sweep(&mut self) -> anyhow::Result<()> {
        if self.swept.is_some_and(|at| at.elapsed() < SWEEP_EVERY) {
            return Ok(());
        }
        let keep = self
            .with_core(|core| core.config().auth.session_ttl())?
            .max(SWEEP_EVERY);
        let store = self.store.as_ref().expect("connected");
        let (sessions, replicas) = store.sweep(&self.replica.task, keep).await?;
        if sessions + replicas > 0 {
            tracing::info!(
                sessions,
                replicas,
                "swept ended sessions and silent replicas"
            );
        }
        self.swept = Some(Instant::now());
        Ok(())
    }

    /// Reports this replica's devices when their numbers changed, or
    /// [`HEARTBEAT_EVERY`] (each heartbeat is a commit, so not every tick).
    async fn heartbeat(&mut self) -> anyhow::Result<()> {
        let status = self.with_core(|core| core.status())?;
        let counts = (status.waiting, status.joined);
        if self
            .beat
            .is_some_and(|(at, seen)| seen == counts && at.elapsed() < HEARTBEAT_EVERY)
        {
            return Ok(());
        }
        let beat = ReplicaBeat {
            name: self.replica.name.clone(),
            url: self.replica.url.clone(),
            waiting: counts.0 as u64,
            joined: counts.1 as u64,
        };
        let store = self.store.as_ref().expect("connected");
        store.heartbeat(&self.replica.task, &beat).await?;
        self.beat = Some((Instant::now(), counts));
        Ok(())
    }

    /// Follows the store's committed state when its round counters moved
    /// (a round ended there, or training stopped).
    async fn follow(&mut self) -> anyhow::Result<()> {
        let store = self.store.as_ref().expect("connected");
        let counters = store
            .run_state(&self.replica.task)
            .await?
            .unwrap_or_default();
        if self.followed.as_ref() == Some(&counters) {
            return Ok(());
        }
        let state = committed(store, &self.replica.task).await?;
        let counters = state.counters.clone();
        self.with_core(|core| core.follow(state))?
            .map_err(core_error)?;
        self.followed = Some(counters);
        Ok(())
    }

    /// Commits the closed shares' sums (a share already there is not
    /// counted twice: the store keeps the first).
    async fn send_sums(&mut self) -> anyhow::Result<()> {
        let mut sums = self.with_core(|core| core.take_share_sums())?;
        self.unsent.append(&mut sums);
        let store = self.store.as_mut().expect("connected");
        while let Some(sum) = self.unsent.first() {
            let partial = Partial {
                replica: self.replica.name.clone(),
                weighted_sum: sum.weighted_sum.clone(),
                weight: sum.weight,
                within_clip: sum.within_clip,
                accepted: sum.accepted as u64,
                selected: sum.selected as u64,
                evaluation: sum.evaluation,
            };
            store
                .put_partial(&self.replica.task, sum.round, sum.model_version, &partial)
                .await?;
            tracing::debug!(
                round = sum.round,
                accepted = sum.accepted,
                "share committed"
            );
            self.unsent.remove(0);
        }
        Ok(())
    }

    /// The leader's part: end the open round, or order the next.
    async fn lead(&mut self, order: Option<RoundOrder>) -> anyhow::Result<()> {
        match order {
            Some(order) => self.end_round(order).await,
            None => self.order_round().await,
        }
    }

    async fn end_round(&mut self, order: RoundOrder) -> anyhow::Result<()> {
        let task = self.replica.task.clone();
        let store = self.store.as_mut().expect("connected");
        let partials = store
            .partials(&task, order.round, order.model_version)
            .await?;
        let all_in = order
            .shares
            .iter()
            .filter(|(_, share)| share.take > 0)
            .all(|(name, _)| partials.iter().any(|p| &p.replica == name));
        if !all_in && SystemTime::now() < order.deadline + GRACE {
            return Ok(());
        }
        let sums: Vec<ShareSum> = partials
            .into_iter()
            .map(|p| ShareSum {
                round: order.round,
                model_version: order.model_version,
                selected: p.selected as usize,
                weighted_sum: p.weighted_sum,
                weight: p.weight,
                within_clip: p.within_clip,
                accepted: p.accepted as usize,
                evaluation: p.evaluation,
            })
            .collect();
        let deadline = self.with_core(|core| core.config().rounds.deadline())?;
        let started = order
            .deadline
            .checked_sub(deadline)
            .unwrap_or(order.deadline);
        let seconds = SystemTime::now()
            .duration_since(started)
            .unwrap_or_default()
            .as_secs_f64();
        let privacy = order.privacy.clone();
        let (summary, counters, checkpoint, accountant) = self.with_core(|core| {
            let summary = core.conclude(order.round, order.kind, &sums, seconds, privacy);
            (
                summary,
                core.counters(),
                core.checkpoint(),
                core.privacy_state(),
            )
        })?;
        let changed = checkpoint.model_version != order.model_version;
        let end = EndRound {
            round: order.round,
            previous: Some(order.model_version),
            model: changed.then_some(NewModel {
                version: checkpoint.model_version,
                params: &checkpoint.params,
                m: &checkpoint.m,
                v: &checkpoint.v,
            }),
            summary: &summary,
            run: &counters,
            privacy: accountant.as_ref(),
        };
        // Whatever happens, follow what the store holds next.
        self.followed = None;
        let store = self.store.as_mut().expect("connected");
        match store.end_round(&task, &end).await {
            Ok(()) => {
                tracing::info!(
                    round = order.round,
                    shares = sums.len(),
                    participants = summary.participants,
                    completed = summary.completed,
                    "round ended across replicas"
                );
                self.window_start = None;
                Ok(())
            }
            // Another leader ended it first: this one's outcome is dropped.
            Err(StoreError::StaleRound { .. } | StoreError::StaleVersion { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn order_round(&mut self) -> anyhow::Result<()> {
        let task = self.replica.task.clone();
        let store = self.store.as_mut().expect("connected");
        let loads: Vec<ReplicaLoad> = store
            .replicas(&task, HEARTBEAT_TIMEOUT)
            .await?
            .into_iter()
            .map(|beat| ReplicaLoad {
                name: beat.name,
                waiting: beat.waiting as usize,
                joined: beat.joined as usize,
            })
            .collect();
        let now = Instant::now();
        if loads.iter().all(|l| l.waiting == 0) {
            self.window_start = None;
            return Ok(());
        }
        let window_start = *self.window_start.get_or_insert(now);
        let (planned, round, version, deadline, accountant) = self.with_core(|core| {
            let planned = core.plan_round(&loads, window_start, now);
            (
                planned,
                core.counters().last_round + 1,
                core.model().version,
                core.config().rounds.deadline(),
                core.privacy_state(),
            )
        })?;
        let plan = match planned {
            Plan::Wait => return Ok(()),
            Plan::Round(plan) => plan,
            Plan::Stop(counters) => {
                // Follow the store next, whether or not this lands.
                self.followed = None;
                let store = self.store.as_mut().expect("connected");
                return match store.put_run_state(&task, &counters).await {
                    Ok(()) | Err(StoreError::StaleRound { .. }) => Ok(()),
                    Err(e) => Err(e.into()),
                };
            }
        };
        let order = RoundOrder {
            round,
            model_version: version,
            kind: plan.kind,
            deadline: SystemTime::now() + deadline,
            shares: plan
                .shares
                .into_iter()
                .map(|(name, (take, needed))| (name, Share { take, needed }))
                .collect(),
            privacy: plan.privacy,
        };
        let store = self.store.as_mut().expect("connected");
        let accountant = accountant.filter(|_| order.privacy.is_some());
        if store.open_round(&task, &order, accountant.as_ref()).await? {
            let kind: TaskKind = order.kind;
            match &order.privacy {
                Some(p) => tracing::info!(
                    round,
                    %kind,
                    replicas = order.shares.len(),
                    epsilon = p.summary.epsilon,
                    "round ordered"
                ),
                None => {
                    tracing::info!(round, %kind, replicas = order.shares.len(), "round ordered")
                }
            }
            self.window_start = None;
        } else {
            // Not ordered (another leader was first): the accountant here
            // may have counted it; take the store's back.
            self.followed = None;
        }
        Ok(())
    }
}

/// `at` on this process's monotonic clock.
fn instant_of(at: SystemTime) -> Instant {
    let now = Instant::now();
    match at.duration_since(SystemTime::now()) {
        Ok(ahead) => now + ahead,
        Err(behind) => now.checked_sub(behind.duration()).unwrap_or(now),
    }
}

/// A seed for this replica from the configured one: replicas of one seed
/// draw different pseudonyms and cohorts (FNV-1a of the name, mixed in).
pub fn replica_seed(seed: u64, name: &str) -> u64 {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    seed ^ hash
}
