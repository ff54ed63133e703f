//! The device's one step on a task, without I/O (the task and its output
//! are in [`crate::task`]).

use super::Device;
use crate::error::ClientError;
use crate::privacy;
use crate::task::{Task, TaskKind, TaskOutput};

impl Device {
    /// Works on `task` with the downloaded global parameters `global`: the
    /// device's whole part of a round, without I/O. A training task fits the
    /// private embedding, evaluates if asked, trains, and applies the task's
    /// differential privacy to the update; an evaluation task fits the
    /// private embedding and ranks the held-out purchase. A task of the
    /// coordinator's settings search ([`Task::validation`]) holds out the
    /// device's own validation purchase instead (see
    /// [`Device::validation_purchase`]).
    ///
    /// Needs [`Consent::Federated`](crate::consent::Consent::Federated);
    /// refuses parameters that do not fit the device's model. Honours the
    /// participation policy's time budget, like [`Device::train`]; the
    /// update's [`training`](LocalUpdate::training) says what was done,
    /// and it is also in the ledger's latest round.
    pub fn run_task(&mut self, task: &Task, global: &[f32]) -> Result<TaskOutput, ClientError> {
        self.ready_for_task(global)?;
        Ok(match task.kind() {
            TaskKind::Evaluate => TaskOutput::Evaluation(self.evaluate_ready(
                global,
                task.training(),
                task.validation(),
            )),
            TaskKind::Train => {
                let mut update =
                    self.train_ready(global, task.training(), task.evaluate(), task.validation());
                if let Some(spec) = task.dp() {
                    update.within_clip = privacy::privatize(&mut update.delta, spec, &mut self.rng);
                }
                TaskOutput::Update(update)
            }
        })
    }
}
