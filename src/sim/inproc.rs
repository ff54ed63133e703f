//! The in-process transport: the coordinator core and the devices in one
//! process, on a virtual clock.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fedrec_client::device::Device;
use fedrec_client::ranking::EvalCounts;
use fedrec_client::task::{Task as DeviceTask, TaskOutput};
use fedrec_coordinator::CoordinatorError;
use fedrec_coordinator::round::{
    CheckIn, Pseudonym, RoundCore, RoundSummary, TaskKind, UpdateHeader,
};
use fedrec_coordinator::service::task_to_pb;
use fedrec_proto::codec::{EncodedModel, Encoding};
use rayon::prelude::*;

use super::*;

/// The rounds, the final evaluation's counts, the final model as devices
/// decode it, and the devices.
pub(super) type Outcome = (Vec<RoundRow>, EvalCounts, Vec<f32>, Vec<(usize, Device)>);

/// Drives the core directly. The clock is virtual and stands still while
/// devices train, so no deadline ever depends on the machine's speed.
pub(super) fn run_inproc(
    mut core: RoundCore,
    mut devices: Vec<(usize, Device)>,
    observer: &mut dyn Observer,
    attack: Option<Attack>,
) -> anyhow::Result<Outcome> {
    let base = Instant::now();
    let mut clock = base;
    let mut pseudonyms: Vec<Pseudonym> = devices.iter().map(|_| core.join(clock, None)).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut rows = Vec::new();
    let mut final_counts = EvalCounts::default();
    let mut round_start = Instant::now();
    loop {
        let mut tasks = Vec::new();
        let mut finished = false;
        for (i, p) in pseudonyms.iter_mut().enumerate() {
            match check_in(&mut core, clock, p)? {
                CheckIn::Task(task) => tasks.push((i, task)),
                CheckIn::Finished { .. } => finished = true,
                _ => {}
            }
        }
        if finished {
            break;
        }
        if tasks.iter().any(|(_, t)| t.secure_aggregation.is_some()) {
            // A secure round needs its whole cohort at once: devices that
            // checked in before it started get their tasks on a second pass.
            tasks.clear();
            for (i, p) in pseudonyms.iter_mut().enumerate() {
                if let CheckIn::Task(task) = check_in(&mut core, clock, p)? {
                    tasks.push((i, task));
                }
            }
        }
        if tasks.is_empty() {
            // Nothing to do until a timer fires: jump the virtual clock to it.
            match core.poll_timeout() {
                Some(t) if t > clock => clock = t,
                _ => clock += Duration::from_secs(1),
            }
        } else {
            run_cohort(
                &mut core,
                clock,
                &mut devices,
                &pseudonyms,
                &tasks,
                threads,
                attack,
            )?;
        }
        for event in core.poll(clock) {
            record_event(
                &event,
                &mut rows,
                &mut final_counts,
                &mut round_start,
                observer,
            );
        }
    }
    let global = core.model().download.decode();
    Ok((rows, final_counts, global, devices))
}

/// Checks a device in; a device whose session ended (the virtual clock of a
/// long simulation can pass `auth.session_ttl_secs`; a device away for
/// longer finds its session swept out) joins again first, as the SDK does
/// when a check-in is refused `UNAUTHENTICATED`.
pub(super) fn check_in(
    core: &mut RoundCore,
    clock: Instant,
    pseudonym: &mut Pseudonym,
) -> anyhow::Result<CheckIn> {
    match core.check_in(clock, pseudonym) {
        Err(CoordinatorError::SessionExpired | CoordinatorError::UnknownPseudonym) => {
            *pseudonym = core.join(clock, None);
            Ok(core.check_in(clock, pseudonym)?)
        }
        outcome => Ok(outcome?),
    }
}

/// Updates in flight per worker thread: the cohort is trained in batches of
/// `threads × IN_FLIGHT_PER_THREAD` devices, so memory holds that many
/// updates, not one per device of the cohort.
pub(super) const IN_FLIGHT_PER_THREAD: usize = 4;

/// Trains or evaluates the cohort in parallel, batch by batch, and submits
/// the results in task order, so the sum is formed in the same order every
/// run. Each device receives its task as over gRPC: the coordinator's task
/// in its wire form, converted by the device ([`DeviceTask::try_from`]).
pub(super) fn run_cohort(
    core: &mut RoundCore,
    clock: Instant,
    devices: &mut [(usize, Device)],
    pseudonyms: &[Pseudonym],
    tasks: &[(usize, fedrec_coordinator::round::Task)],
    threads: usize,
    attack: Option<Attack>,
) -> anyhow::Result<()> {
    // What every device of the cohort downloads: the same values as over
    // gRPC, in the configured encoding.
    let received = core.model().download.decode();
    let global = &received;
    let mut selected: Vec<(&mut Device, DeviceTask)> = Vec::with_capacity(tasks.len());
    {
        let mut it = devices.iter_mut().enumerate();
        for (i, task) in tasks {
            let (_, (_, d)) = it
                .by_ref()
                .find(|(j, _)| j == i)
                .context("task for an unknown device")?;
            let task = DeviceTask::try_from(&task_to_pb(task, clock))
                .context("the device refused its task")?;
            selected.push((d, task));
        }
    }
    if tasks.iter().any(|(_, t)| t.secure_aggregation.is_some()) {
        let seed = core.config().rounds.seed.unwrap_or_default();
        let cohort = selected
            .into_iter()
            .zip(tasks)
            .map(|(device, (i, task))| (pseudonyms[*i], task.clone(), device))
            .collect();
        secagg::drive_round(
            core,
            clock,
            cohort,
            seed,
            threads,
            IN_FLIGHT_PER_THREAD,
            |_, (device, task)| Ok(device.run_task(task, global)?.secure_input(task)?),
        )?;
        return Ok(());
    }
    let batch = threads * IN_FLIGHT_PER_THREAD;
    for (part, part_tasks) in selected.chunks_mut(batch).zip(tasks.chunks(batch)) {
        // Devices train independently (each with its own seeded state); the
        // ordered collect hands results to the core in cohort order.
        let results: Vec<anyhow::Result<TaskOutput>> = part
            .par_iter_mut()
            .map(|(device, task)| run_task(device, task, global))
            .collect();
        let seed = core.config().rounds.seed.unwrap_or_default();
        for ((i, task), result) in part_tasks.iter().zip(results) {
            let mut result = result?;
            if let (Some(attack), TaskOutput::Update(update)) = (&attack, &mut result)
                && attack.applies(seed, *i)
            {
                attack.corrupt(&mut update.delta, seed ^ *i as u64, task.round);
            }
            match submit(core, clock, pseudonyms[*i], task, result) {
                // An over-selected device after its round reached its
                // target, or an async update that waited behind too many
                // steps.
                Err(e) if came_too_late(&e) => {}
                other => other?,
            }
        }
    }
    Ok(())
}

/// Whether `e` is the coordinator refusing a late update
/// ([`CoordinatorError::came_too_late`]).
pub(super) fn came_too_late(e: &anyhow::Error) -> bool {
    e.downcast_ref::<CoordinatorError>()
        .is_some_and(CoordinatorError::came_too_late)
}

/// Hands one device's result to the coordinator core.
pub(super) fn submit(
    core: &mut RoundCore,
    clock: Instant,
    who: Pseudonym,
    task: &fedrec_coordinator::round::Task,
    result: TaskOutput,
) -> anyhow::Result<()> {
    match result {
        TaskOutput::Update(update) => {
            let header = UpdateHeader {
                pseudonym: who,
                round: task.round,
                model_version: task.model_version,
                num_examples: update.num_examples,
                num_values: update.delta.len() as u64,
                evaluation: update.evaluation,
            };
            let bytes = fedrec_proto::tensor::le_bytes(&update.delta);
            core.submit_update(clock, header, &bytes)?;
        }
        TaskOutput::Evaluation(counts) => {
            core.submit_evaluation(
                clock,
                &who,
                task.round,
                task.model_version,
                counts.unwrap_or_default(),
            )?;
        }
        _ => bail!(
            "round {}: a task output the simulation does not know",
            task.round
        ),
    }
    Ok(())
}

/// The device's work on a plain round's task, and what its upload in the
/// task's encoding delivers to the coordinator.
pub(super) fn run_task(
    device: &mut Device,
    task: &DeviceTask,
    global: &[f32],
) -> anyhow::Result<TaskOutput> {
    let mut output = device.run_task(task, global)?;
    if let TaskOutput::Update(update) = &mut output
        && task.upload_encoding() != Encoding::F32
    {
        update.delta = EncodedModel::for_upload(&update.delta, task.upload_encoding()).decode();
    }
    Ok(output)
}

pub(super) fn record_event(
    event: &fedrec_coordinator::round::Event,
    rows: &mut Vec<RoundRow>,
    final_counts: &mut EvalCounts,
    round_start: &mut Instant,
    observer: &mut dyn Observer,
) {
    use fedrec_coordinator::round::Event;
    match event {
        Event::RoundStarted { .. } => *round_start = Instant::now(),
        Event::RoundEnded(s) => record_summary(
            s,
            round_start.elapsed().as_secs_f64(),
            rows,
            final_counts,
            observer,
        ),
        _ => {}
    }
}

pub(super) fn record_summary(
    s: &RoundSummary,
    seconds: f64,
    rows: &mut Vec<RoundRow>,
    final_counts: &mut EvalCounts,
    observer: &mut dyn Observer,
) {
    match s.kind {
        TaskKind::Evaluate => *final_counts = s.evaluation,
        _ => {
            let r = row(s, seconds);
            observer.round(&r);
            rows.push(r);
        }
    }
}
