//! Secure aggregation in process: one round of the coordinator core and the
//! devices' [`SecAggClient`]s, driven by direct calls (no sockets), exactly
//! the messages the gRPC transport would carry.
//!
//! Randomness (identity keys, round keys, shares) comes from a seeded
//! ChaCha20 stream, so in-process simulations stay deterministic. Time spent
//! in the coordinator and in each device is measured separately, so that the
//! benchmark can tell the coordinator's cost from the devices' (which run in
//! parallel on separate machines in a deployment).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fedrec_client::secagg::SecAggClient;
use fedrec_coordinator::round::{Pseudonym, RoundCore, SecurePoll, SecureWant, Task};
use fedrec_proto::secagg::{MaskedInput, crypto};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rayon::prelude::*;

/// Where the time of one secure round went.
#[derive(Clone, Debug, Default)]
pub struct SecureTiming {
    /// Inside the coordinator core (every call, and the unmasking).
    pub coordinator: Duration,
    /// Of which the unmasking job.
    pub unmask: Duration,
    /// The coordinator's time per step (advertise, share keys, masked
    /// input, unmask), the unmasking job not included.
    pub coordinator_steps: [Duration; 4],
    /// Per step (advertise, share keys, mask, unmask), the longest time one
    /// device spent on it: the devices' critical path when each runs on its
    /// own hardware.
    pub device_max: [Duration; 4],
    /// Per step, the time all devices spent on it together.
    pub device_total: [Duration; 4],
    /// Per step, the number of devices timed.
    pub device_count: [u32; 4],
    /// Producing the inputs (local training, or its stub): not part of
    /// secure aggregation.
    pub inputs: Duration,
    /// The most heap bytes the coordinator's secure aggregation state held
    /// at the end of a step.
    pub peak_state_bytes: usize,
}

impl SecureTiming {
    fn state(&mut self, core: &RoundCore) {
        let bytes = core.secure_state_bytes().unwrap_or(0);
        self.peak_state_bytes = self.peak_state_bytes.max(bytes);
    }

    /// Runs a coordinator call of `step`, timing it.
    fn in_core<R>(&mut self, step: usize, f: impl FnOnce() -> R) -> R {
        let start = Instant::now();
        let r = f();
        let spent = start.elapsed();
        self.coordinator += spent;
        self.coordinator_steps[step] += spent;
        r
    }

    fn device(&mut self, step: usize, spent: Duration) {
        self.device_max[step] = self.device_max[step].max(spent);
        self.device_total[step] += spent;
        self.device_count[step] += 1;
    }

    /// The devices' critical path: the sum over steps of the slowest device.
    /// On a shared simulation host it includes the host's scheduling noise.
    pub fn device_critical_path(&self) -> Duration {
        self.device_max.iter().sum()
    }

    /// A typical device's time: the sum over steps of the mean device time.
    pub fn device_mean_path(&self) -> Duration {
        self.device_total
            .iter()
            .zip(self.device_count)
            .map(|(total, n)| total.checked_div(n).unwrap_or_default())
            .sum()
    }
}

/// Runs `f`, adding its duration to `into`.
fn timed<R>(into: &mut Duration, f: impl FnOnce() -> R) -> R {
    let start = Instant::now();
    let r = f();
    *into += start.elapsed();
    r
}

/// One device of the cohort: its pseudonym, task, protocol state and RNG.
struct Member<D> {
    pseudonym: Pseudonym,
    task: Task,
    client: Option<SecAggClient>,
    rng: ChaCha20Rng,
    data: D,
}

impl<D> Member<D> {
    fn client(&mut self) -> anyhow::Result<&mut SecAggClient> {
        self.client
            .as_mut()
            .context("the device has no protocol state")
    }
}

/// Runs `f` on every item on `pool`, and returns the results in order
/// with the time each took.
fn parallel<T: Send, R: Send>(
    pool: &rayon::ThreadPool,
    items: &mut [T],
    f: impl Fn(&mut T) -> R + Sync,
) -> Vec<(R, Duration)> {
    pool.install(|| {
        items
            .par_iter_mut()
            .map(|item| {
                let start = Instant::now();
                let r = f(item);
                (r, start.elapsed())
            })
            .collect()
    })
}

/// Drives the open round's secure aggregation to its end: every device in
/// `cohort` takes the four steps; `input` produces a device's payload
/// (`fedrec_proto::secagg::payload::encode` of its update: in a
/// simulation, [`fedrec_client::task::TaskOutput::secure_input`], as over
/// gRPC) in a worker thread, `threads × in_flight_per_thread` devices at a time, so that only
/// that many inputs are in memory at once. Device work runs on `threads`
/// threads, coordinator calls on this one. `seed` makes the keys
/// reproducible. Returns the timing.
pub fn drive_round<D, F>(
    core: &mut RoundCore,
    clock: Instant,
    cohort: Vec<(Pseudonym, Task, D)>,
    seed: u64,
    threads: usize,
    in_flight_per_thread: usize,
    input: F,
) -> anyhow::Result<SecureTiming>
where
    D: Send,
    F: Fn(&Task, &mut D) -> anyhow::Result<Vec<f32>> + Sync,
{
    let mut timing = SecureTiming::default();
    let Some(round) = cohort.first().map(|(_, t, _)| t.round) else {
        return Ok(timing);
    };
    // A pool of its own: the device work runs on exactly `threads` threads
    // (the secure-aggregation benchmark sets them).
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .context("starting the device threads")?;
    let round_seed = seed ^ u64::from(round).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut members: Vec<Member<D>> = cohort
        .into_iter()
        .enumerate()
        .map(|(i, (pseudonym, task, data))| Member {
            pseudonym,
            task,
            client: None,
            rng: ChaCha20Rng::seed_from_u64(round_seed.wrapping_add(i as u64)),
            data,
        })
        .collect();

    // Step 1: advertise.
    let advertisements = parallel(&pool, &mut members, |m| {
        let secure = m
            .task
            .secure_aggregation
            .clone()
            .context("a task without secure aggregation in a secure round")?;
        let identity = crypto::generate_identity(&mut m.rng);
        let mut client = SecAggClient::new(secure.config, round.into(), secure.party, identity)?;
        let advertisement = client.advertise(&mut m.rng)?;
        m.client = Some(client);
        anyhow::Ok(advertisement)
    });
    for (m, (advertisement, spent)) in members.iter().zip(advertisements) {
        timing.device(0, spent);
        let advertisement = advertisement?;
        timing.in_core(0, || {
            core.secagg_advertise(clock, &m.pseudonym, round, advertisement)
        })?;
    }

    timing.state(core);

    // Step 2: rosters and shares.
    let mut rosters = Vec::with_capacity(members.len());
    for m in &members {
        let poll = timing.in_core(1, || {
            core.secagg_poll(clock, &m.pseudonym, round, SecureWant::Roster)
        })?;
        let SecurePoll::Roster(roster) = poll else {
            bail!("round {round}: expected a roster, got {poll:?}");
        };
        rosters.push(Some(roster));
    }
    let mut work: Vec<(&mut Member<D>, Option<_>)> = members.iter_mut().zip(rosters).collect();
    let keys = parallel(&pool, &mut work, |(m, roster)| {
        let roster = roster.take().context("one roster per device")?;
        let rng = &mut m.rng;
        let keys = m
            .client
            .as_mut()
            .context("the device has no protocol state")?
            .handle_roster(&roster, rng)?;
        anyhow::Ok(keys)
    });
    drop(work);
    for (m, (keys, spent)) in members.iter().zip(keys) {
        timing.device(1, spent);
        let keys = keys?;
        timing.in_core(1, || {
            core.secagg_share_keys(clock, &m.pseudonym, round, keys)
        })?;
    }

    timing.state(core);

    // Step 3: inputs and masks, a batch of devices at a time in parallel.
    let batch = (threads * in_flight_per_thread).max(1);
    for part in members.chunks_mut(batch) {
        // The sum and the shares in transit are both held now.
        timing.state(core);
        let mut deliveries = Vec::with_capacity(part.len());
        for m in part.iter() {
            let poll = timing.in_core(2, || {
                core.secagg_poll(clock, &m.pseudonym, round, SecureWant::Shares)
            })?;
            let SecurePoll::Shares(delivery) = poll else {
                bail!("round {round}: expected shares, got {poll:?}");
            };
            deliveries.push(delivery);
        }
        let results: Vec<anyhow::Result<(MaskedInput, Duration, Duration)>> = pool.install(|| {
            part.par_iter_mut()
                .zip(&deliveries)
                .map(|(m, d)| {
                    let start = Instant::now();
                    let values = input(&m.task, &mut m.data)?;
                    let made = start.elapsed();
                    let start = Instant::now();
                    let masked = m.client()?.handle_shares(d, &values)?;
                    Ok((masked, made, start.elapsed()))
                })
                .collect()
        });
        for (m, result) in part.iter().zip(results) {
            let (masked, made, spent) = result?;
            timing.inputs += made;
            timing.device(2, spent);
            timing.in_core(2, || {
                core.secagg_masked_input(clock, &m.pseudonym, round, m.task.model_version, &masked)
            })?;
        }
    }

    timing.state(core);

    // Step 4: unmask, then the coordinator removes the masks.
    for m in &mut members {
        let poll = timing.in_core(3, || {
            core.secagg_poll(clock, &m.pseudonym, round, SecureWant::Unmask)
        })?;
        let request = match poll {
            SecurePoll::Unmask(request) => request,
            // The last step closes as soon as every secret has its shares:
            // the remaining devices are not asked.
            SecurePoll::Wait { .. } | SecurePoll::Ended { .. } => break,
            other => bail!("round {round}: expected an unmask request, got {other:?}"),
        };
        let start = Instant::now();
        let response = m.client()?.handle_unmask(&request)?;
        timing.device(3, start.elapsed());
        timing.in_core(3, || {
            core.secagg_unmask(clock, &m.pseudonym, round, response)
        })?;
    }
    timing.state(core);
    timed(&mut timing.unmask, || core.run_unmask_jobs(clock));
    timing.coordinator += timing.unmask;
    Ok(timing)
}
