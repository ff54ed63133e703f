//! The gRPC participant: takes a [`Device`] through rounds with a coordinator.
//!
//! The participant only moves bytes. It joins (receiving a pseudonym), checks
//! in, converts the task it receives into a [`Task`] (the one place a wire
//! task is read and checked), downloads the global model, lets the device
//! work on the task ([`Device::run_task`]), and uploads the [`TaskOutput`].
//! Every message it sends is logged in a [`SentLog`] (kind, round, bytes),
//! so an app can show what left the device.
//!
//! Given several coordinator endpoints (the replicas of one coordinator),
//! it uses one at a time and moves to the next whenever the one in use
//! cannot be reached, keeping its pseudonym ([`Participant::connect_any`]).
//!
//! A training task with secure aggregation takes the four SecAgg+ steps
//! instead of the plain upload (see the `secure` submodule): the
//! coordinator then learns only the cohort's sum.

mod secagg;

use std::sync::Arc;
use std::time::Duration;

use fedrec_proto::catalogue::Catalogue;
use fedrec_proto::codec::{CodecError, EncodedModel, Encoding, ModelAssembler};
use fedrec_proto::pb::coordinator_client::CoordinatorClient;
use fedrec_proto::{Layout, PROTOCOL_VERSION, pb};
use prost::Message;
use tonic::transport::Channel;

use crate::connect::{ConnectOptions, Endpoints};
use crate::device::{Device, LocalUpdate};
use crate::eligibility::{self, Gate};
use crate::error::ClientError;
use crate::model;
use crate::ranking::EvalCounts;
use crate::task::{Task, TaskKind, TaskOutput};
pub use crate::transparency::SentMessage;

/// A hook that sees the encoded bytes of every message the device sends.
pub type Recorder = Box<dyn FnMut(&'static str, &[u8]) + Send>;

/// What left the device: every message, by kind, round and size.
#[derive(Default)]
pub struct SentLog {
    messages: Vec<SentMessage>,
    recorder: Option<Recorder>,
}

impl std::fmt::Debug for SentLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentLog")
            .field("messages", &self.messages.len())
            .finish()
    }
}

impl SentLog {
    fn log<M: Message>(&mut self, kind: &'static str, round: u32, msg: &M) {
        self.messages.push(SentMessage {
            kind,
            round,
            bytes: msg.encoded_len(),
        });
        if let Some(rec) = self.recorder.as_mut() {
            rec(kind, &msg.encode_to_vec());
        }
    }

    /// Every message sent so far.
    pub fn messages(&self) -> &[SentMessage] {
        &self.messages
    }

    /// Total bytes sent.
    pub fn total_bytes(&self) -> usize {
        self.messages.iter().map(|m| m.bytes).sum()
    }
}

/// What a participant did until the coordinator said it had finished.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParticipationSummary {
    /// Training tasks completed and accepted.
    pub trained: u32,
    /// Evaluation tasks completed and accepted.
    pub evaluated: u32,
    /// Submissions the coordinator refused (e.g. the round had closed).
    pub refused: u32,
    /// Tasks cut short because the coordinator became unreachable (it
    /// restarted, the network failed); the device carried on after.
    pub interrupted: u32,
    /// Times the device reached the coordinator again after losing it.
    pub reconnects: u32,
    /// Times the device moved to another of its coordinator endpoints
    /// because the one in use could not be reached (see
    /// [`Participant::connect_any`]); always 0 with a single endpoint.
    pub failovers: u32,
    /// Times the device joined again because the coordinator no longer
    /// knew its session (it expired, or the coordinator lost it).
    pub rejoins: u32,
    /// Training tasks under differential privacy declined because the
    /// device had already trained in that round (at another replica it
    /// moved from): a round counts each device once, which the privacy
    /// accountant relies on.
    pub declined: u32,
    /// Why the coordinator finished.
    pub finished_reason: String,
}

/// How a task ended for the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TaskEnd {
    /// The coordinator accepted the submission.
    Accepted,
    /// The coordinator refused a request (e.g. the round had closed).
    Refused,
    /// The coordinator could not be reached.
    Interrupted,
}

impl TaskEnd {
    /// How `err`, met during a task, ends it: a refusal or an interruption
    /// for an RPC error; any other error is the device's own and is returned.
    fn after(err: ClientError) -> Result<Self, ClientError> {
        match err {
            ClientError::Rpc { status, .. } if unreachable(&status) => Ok(Self::Interrupted),
            ClientError::Rpc { .. } => Ok(Self::Refused),
            other => Err(other),
        }
    }
}

/// Whether a status means the coordinator could not be reached (it is down
/// or restarting, or the connection broke) rather than that it refused:
/// one of the codes the coordinator itself never answers with, or any
/// status made from a transport error (which carries that error as its
/// source; a connection cut in the middle of a stream can surface as
/// `INTERNAL`).
pub(crate) fn unreachable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    ) || std::error::Error::source(status).is_some()
}

/// Whether `err`, met connecting and joining, means that the endpoint
/// could not be reached or talked to (so that another may be tried),
/// rather than that the coordinator refused the device.
fn not_reached(err: &ClientError) -> bool {
    match err {
        ClientError::Rpc { status, .. } => unreachable(status),
        ClientError::Connect { .. }
        | ClientError::TlsRefused { .. }
        | ClientError::PlainTextToTls { .. } => true,
        _ => false,
    }
}

/// A device's connection to a coordinator.
pub struct Participant {
    /// Over a channel to the endpoint in use.
    client: CoordinatorClient<Channel>,
    /// The endpoints it may use, and the one in use; `None` when it was
    /// made from a channel ([`join`](Self::join)): it cannot move then.
    endpoints: Option<Endpoints>,
    pseudonym: String,
    /// The enrollment token, for joining again when the session ends.
    token: Option<String>,
    chunk_bytes: usize,
    sent: SentLog,
    /// The catalogue the coordinator announced at join, if it did.
    catalogue: Option<Catalogue>,
    /// The global model's layout, as announced at join (empty if not).
    layout: Layout,
    /// Permits shared by the participants of one process: a task holds one
    /// from its download to its upload's end (see [`Participant::with_work_limit`]).
    work_limit: Option<Arc<tokio::sync::Semaphore>>,
    /// The last training round this device took part in (round, model
    /// version): a second task of the same round is declined.
    trained_in: Option<(u32, u64)>,
}

impl std::fmt::Debug for Participant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Participant")
            .field("pseudonym", &self.pseudonym)
            .field("endpoint", &self.endpoint())
            .finish()
    }
}

fn rpc(request: &'static str) -> impl FnOnce(tonic::Status) -> ClientError {
    move |status| ClientError::Rpc { request, status }
}

impl Participant {
    /// Connects to `endpoints` (e.g. `http://127.0.0.1:50051`, or a
    /// comma-separated list of replicas) in plain text and joins; see
    /// [`connect_any`](Self::connect_any).
    pub async fn connect(endpoints: &str) -> Result<Self, ClientError> {
        Self::connect_with(endpoints, &ConnectOptions::default()).await
    }

    /// Connects to `endpoints`, one URL or a comma-separated list of them
    /// (`http://a:50051,http://b:50051`), with `options` and joins: the
    /// same as [`connect_any`](Self::connect_any) with the list split.
    pub async fn connect_with(
        endpoints: &str,
        options: &ConnectOptions,
    ) -> Result<Self, ClientError> {
        Self::connect_to(Endpoints::parse(endpoints, options)?, options).await
    }

    /// Connects to one of `endpoints` with `options` (TLS for `https://`, a
    /// device certificate for mutual TLS, an enrollment token; the same for
    /// each) and joins. Under mutual TLS a coordinator that refuses the
    /// device's certificate (or its absence) is noticed here, on the Join
    /// request.
    ///
    /// Several endpoints are the replicas of one coordinator, which share
    /// the device's session (or the addresses of one behind a load
    /// balancer). They are tried in order until one answers Join (a
    /// refusal, e.g. of the enrollment token, ends the attempt at once;
    /// when none can be reached, the last one's error is returned). Later,
    /// whenever a request fails because the endpoint in use cannot be
    /// reached, the participant moves to the next one, round robin, before
    /// it tries again, keeping its pseudonym; it joins again only if that
    /// replica does not know its session (`UNAUTHENTICATED`). In
    /// [`run`](Self::run) the back-off applies once a whole pass over the
    /// list failed, so a live replica is reached at once. Moves are logged
    /// and counted ([`ParticipationSummary::failovers`]).
    pub async fn connect_any(
        endpoints: &[impl AsRef<str>],
        options: &ConnectOptions,
    ) -> Result<Self, ClientError> {
        Self::connect_to(Endpoints::new(endpoints, options)?, options).await
    }

    async fn connect_to(
        mut endpoints: Endpoints,
        options: &ConnectOptions,
    ) -> Result<Self, ClientError> {
        let token = options.token().map(str::to_owned);
        let mut tried = 0;
        loop {
            let url = endpoints.url().to_owned();
            let joined = match endpoints.connect().await {
                Ok(channel) => Self::join_with_token(channel, None, token.clone())
                    .await
                    .map_err(|e| options.explain_refusal(&url, e)),
                Err(e) => Err(e),
            };
            tried += 1;
            match joined {
                Ok(mut participant) => {
                    participant.endpoints = Some(endpoints);
                    return Ok(participant);
                }
                Err(e) if not_reached(&e) && tried < endpoints.len() => {
                    tracing::warn!(endpoint = %url, error = %e, "coordinator unreachable; trying the next endpoint");
                    endpoints.advance();
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Joins over an existing channel. `recorder`, if given, sees the encoded
    /// bytes of every message sent (for audits and tests).
    pub async fn join(channel: Channel, recorder: Option<Recorder>) -> Result<Self, ClientError> {
        Self::join_with_token(channel, recorder, None).await
    }

    /// [`join`](Self::join) presenting an enrollment token (see
    /// [`ConnectOptions::enrollment_token`]).
    pub async fn join_with_token(
        channel: Channel,
        recorder: Option<Recorder>,
        token: Option<String>,
    ) -> Result<Self, ClientError> {
        let mut participant = Self {
            client: CoordinatorClient::new(channel),
            endpoints: None,
            pseudonym: String::new(),
            token,
            chunk_bytes: fedrec_proto::DEFAULT_CHUNK_BYTES,
            sent: SentLog {
                messages: Vec::new(),
                recorder,
            },
            catalogue: None,
            layout: Layout::new(Vec::new()),
            work_limit: None,
            trained_in: None,
        };
        participant.join_again().await?;
        Ok(participant)
    }

    /// Joins (again), replacing the pseudonym.
    pub(crate) async fn join_again(&mut self) -> Result<(), ClientError> {
        let req = pb::JoinRequest {
            protocol_version: PROTOCOL_VERSION,
            enrollment_token: self.token.clone().unwrap_or_default(),
        };
        self.sent.log("JoinRequest", 0, &req);
        let resp = self
            .client
            .join(req)
            .await
            .map_err(rpc("Join"))?
            .into_inner();
        self.pseudonym = resp.pseudonym;
        // A new session: its rounds are new to the device.
        self.trained_in = None;
        self.catalogue = resp
            .catalogue
            .as_ref()
            .map(Catalogue::try_from)
            .transpose()
            .map_err(|e| ClientError::Protocol(format!("the coordinator's {e}")))?;
        self.layout = Layout::from_pb(&resp.layout);
        Ok(())
    }

    /// The coordinator's catalogue, announced when the device joined: map
    /// purchases' item ids into model rows with [`Catalogue::index`]. `None`
    /// when the coordinator announced none (the app must know it).
    pub fn catalogue(&self) -> Option<&Catalogue> {
        self.catalogue.as_ref()
    }

    /// The global model's layout, announced when the device joined (no
    /// tensors when the coordinator announced none); build the device's
    /// model with [`crate::model::for_layout`].
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The pseudonym the coordinator gave this device.
    pub fn pseudonym(&self) -> &str {
        &self.pseudonym
    }

    /// The coordinator endpoint in use; `None` for a participant made from
    /// a channel ([`join`](Self::join)).
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoints.as_ref().map(Endpoints::url)
    }

    /// The client of the endpoint in use (a cheap clone).
    pub(crate) fn client(&self) -> CoordinatorClient<Channel> {
        self.client.clone()
    }

    /// How many endpoints the participant may use (1 when made from a channel).
    pub(crate) fn endpoint_count(&self) -> usize {
        self.endpoints.as_ref().map_or(1, Endpoints::len)
    }

    /// Moves to the next endpoint, round robin, after the one in use could
    /// not be reached; keeps the pseudonym. Returns whether it moved (not
    /// with a single endpoint, whose channel reconnects by itself).
    pub(crate) fn fail_over(&mut self) -> bool {
        let Some(endpoints) = self.endpoints.as_mut().filter(|e| e.len() > 1) else {
            return false;
        };
        let from = endpoints.url().to_owned();
        endpoints.advance();
        self.client = CoordinatorClient::new(endpoints.connect_lazy());
        tracing::info!(pseudonym = %self.pseudonym, from = %from, to = %endpoints.url(), "coordinator unreachable; moved to the next endpoint");
        true
    }

    /// What left the device so far.
    pub fn sent(&self) -> &SentLog {
        &self.sent
    }

    /// Takes part in rounds until the coordinator finishes. Training runs on a
    /// blocking thread so that it does not stall the async runtime. Refused
    /// submissions (a round that closed meanwhile) are counted, not fatal.
    ///
    /// Survives the coordinator: while it cannot be reached (a restart, a
    /// network failure), the device waits with the policy's `reconnect`
    /// back-off and tries again, for up to `reconnect_for`; a task cut
    /// short is counted as interrupted. With several endpoints
    /// ([`connect_any`](Self::connect_any)) it moves to the next one after
    /// each such failure, and backs off only once a whole pass over them
    /// failed. When the coordinator no longer knows
    /// the device's session (`UNAUTHENTICATED`: expired, or lost), the
    /// device joins again, with its enrollment token if it has one.
    ///
    /// Refuses ([`ClientError::ConsentRequired`]) unless the shopper's consent
    /// is federated, checked before every check-in and again before anything
    /// computed is sent. The shopper's exclusions are read when the device
    /// computes (see [`Device::history`]). Checks in only while the device's
    /// [`ParticipationPolicy`](crate::eligibility::ParticipationPolicy) finds
    /// it eligible (waiting with back-off otherwise), and returns early when
    /// that policy says so (task limit, giving up).
    pub async fn run(
        &mut self,
        mut device: Device,
    ) -> Result<(Device, ParticipationSummary), ClientError> {
        let mut summary = ParticipationSummary::default();
        // While the coordinator is unreachable: since when, the next wait,
        // and the check-ins that failed (one per endpoint makes a pass).
        let mut outage: Option<(tokio::time::Instant, Duration, usize)> = None;
        // The wait before the next re-join, once a re-join did not lead to
        // an accepted check-in (a back-off, so that a coordinator that keeps
        // refusing fresh sessions is not flooded with joins).
        let mut rejoin_wait: Option<Duration> = None;
        loop {
            // Consent, the app's conditions and the task limit, before every check-in.
            let done = summary.trained + summary.evaluated + summary.refused;
            if let Gate::Stop(reason) =
                eligibility::before_check_in(&device.participation, &device.consent, done).await?
            {
                summary.finished_reason = reason;
                return Ok((device, summary));
            }
            let req = pb::CheckInRequest {
                pseudonym: self.pseudonym.clone(),
            };
            self.sent.log("CheckInRequest", 0, &req);
            let resp = match self.client.check_in(req).await {
                Ok(resp) => {
                    if outage.take().is_some() {
                        summary.reconnects += 1;
                    }
                    rejoin_wait = None;
                    resp.into_inner()
                }
                Err(status) if unreachable(&status) => {
                    let policy = &device.participation;
                    let (since, wait, failed) = outage.get_or_insert((
                        tokio::time::Instant::now(),
                        policy.reconnect.initial,
                        0,
                    ));
                    if policy
                        .reconnect_for
                        .is_some_and(|limit| since.elapsed() >= limit)
                    {
                        return Err(rpc("CheckIn")(status));
                    }
                    // The next endpoint at once; the back-off after a pass.
                    *failed += 1;
                    if self.fail_over() {
                        summary.failovers += 1;
                    }
                    if *failed % self.endpoint_count() == 0 {
                        tracing::debug!(code = ?status.code(), wait_ms = wait.as_millis(), "coordinator unreachable; trying again");
                        tokio::time::sleep(*wait).await;
                        *wait = (*wait * 2).min(policy.reconnect.max.max(policy.reconnect.initial));
                    }
                    continue;
                }
                // A session the coordinator no longer knows (expired, or
                // lost in a restart): join again, each time, after a
                // back-off once a re-join was refused in turn. A join that
                // is refused (a revoked token) ends the run.
                Err(status) if status.code() == tonic::Code::Unauthenticated => {
                    tracing::debug!(message = status.message(), "session refused; joining again");
                    if outage.take().is_some() {
                        summary.reconnects += 1;
                    }
                    let policy = &device.participation.reconnect;
                    if let Some(wait) = rejoin_wait {
                        tokio::time::sleep(wait).await;
                    }
                    rejoin_wait = Some(rejoin_wait.map_or(policy.initial, |w| {
                        (w * 2).min(policy.max.max(policy.initial))
                    }));
                    self.join_again().await?;
                    summary.rejoins += 1;
                    continue;
                }
                Err(status) => return Err(rpc("CheckIn")(status)),
            };
            let task = match resp.outcome {
                Some(pb::check_in_response::Outcome::Task(task)) => task,
                Some(pb::check_in_response::Outcome::Wait(w)) => {
                    if w.retry_after_ms > 0 {
                        tokio::time::sleep(Duration::from_millis(w.retry_after_ms.into())).await;
                    }
                    continue;
                }
                Some(pb::check_in_response::Outcome::Finished(f)) => {
                    summary.finished_reason = f.reason;
                    return Ok((device, summary));
                }
                None => {
                    return Err(ClientError::Protocol(
                        "check-in answer without outcome".into(),
                    ));
                }
            };
            // The one conversion of the wire task: checked here, trusted after.
            let task = Task::try_from(&task)?;
            // Under differential privacy a round counts each device once
            // (the accountant's sampling); replicas of a coordinator could
            // offer one round twice. Asynchronous tasks share a round
            // number and are not concerned (they carry no DP).
            let this = (task.round(), task.model_version());
            let once = task.kind() == TaskKind::Train && task.dp().is_some();
            if once && self.trained_in == Some(this) {
                tracing::info!(
                    round = task.round(),
                    "declined a second training task of one round"
                );
                summary.declined += 1;
                // The replica offers it until the round's deadline.
                tokio::time::sleep(task.deadline()).await;
                continue;
            }
            device.note_task(&task);
            let (back, ended) = self.do_task(device, &task).await?;
            device = back;
            if once && ended == TaskEnd::Accepted {
                self.trained_in = Some(this);
            }
            match (ended, task.kind()) {
                (TaskEnd::Refused, _) => summary.refused += 1,
                (TaskEnd::Interrupted, _) => {
                    summary.interrupted += 1;
                    if self.fail_over() {
                        summary.failovers += 1;
                    }
                }
                (TaskEnd::Accepted, TaskKind::Evaluate) => summary.evaluated += 1,
                (TaskEnd::Accepted, _) => summary.trained += 1,
            }
        }
    }

    /// Shares `permits` with other participants of the process: at most
    /// that many of them hold a task's model, training and update at once
    /// (a simulation of thousands of devices in one process keeps its
    /// memory bounded; a device waiting for a permit has not downloaded
    /// yet).
    pub fn with_work_limit(mut self, permits: Arc<tokio::sync::Semaphore>) -> Self {
        self.work_limit = Some(permits);
        self
    }

    async fn do_task(
        &mut self,
        device: Device,
        task: &Task,
    ) -> Result<(Device, TaskEnd), ClientError> {
        let _permit = match &self.work_limit {
            Some(permits) => Some(
                Arc::clone(permits)
                    .acquire_owned()
                    .await
                    .map_err(|_| ClientError::Protocol("the work limit was closed".into()))?,
            ),
            None => None,
        };
        if task.secure().is_some() {
            return self.do_secure_task(device, task).await;
        }
        let mut device = device;
        let global = match self.download(&mut device, task).await {
            Ok(global) => global,
            Err(e) => return TaskEnd::after(e).map(|end| (device, end)),
        };
        let work = task.clone();
        let (device, upload) = tokio::task::spawn_blocking(move || {
            let mut device = device;
            let upload = device
                .run_task(&work, &global)
                .map(|output| Upload::new(output, work.upload_encoding()));
            (device, upload)
        })
        .await
        .map_err(|e| ClientError::Protocol(format!("local training task failed: {e}")))?;
        // The shopper may have withdrawn consent while the device trained.
        device.consent_cell().require_training()?;
        let result = match upload? {
            Upload::Evaluation(counts) => self.submit_evaluation(task, counts).await,
            Upload::Update(update, encoded) => self.submit_update(task, update, encoded).await,
        };
        match result {
            Ok(()) => Ok((device, TaskEnd::Accepted)),
            Err(e) => {
                tracing::debug!(pseudonym = %self.pseudonym, round = task.round(), error = %e, "submission not accepted");
                TaskEnd::after(e).map(|end| (device, end))
            }
        }
    }

    /// Downloads the task's model version. Nothing is kept between tasks, so
    /// an idle device holds no copy of the model.
    ///
    /// The model's shape may change between tasks (the trials of the
    /// coordinator's settings search, [`Task::validation`]): a download of
    /// another layout that this SDK can build is adopted, the device's
    /// model replaced and its private embedding started afresh at the new
    /// size ([`adopt_layout`]), and the participant's
    /// [`layout`](Self::layout) follows. A layout it cannot build is a
    /// [`ClientError::ModelMismatch`], refused from the first chunk.
    async fn download(
        &mut self,
        device: &mut Device,
        task: &Task,
    ) -> Result<Vec<f32>, ClientError> {
        let req = pb::ModelRequest {
            pseudonym: self.pseudonym.clone(),
            round: task.round(),
            model_version: task.model_version(),
        };
        self.sent.log("ModelRequest", task.round(), &req);
        let mut stream = self
            .client
            .download_model(req)
            .await
            .map_err(rpc("DownloadModel"))?
            .into_inner();
        let (layout, values) = receive_model(
            &mut stream,
            device.model().layout(),
            OtherLayouts::IfBuildable,
        )
        .await?;
        adopt_layout(device, &layout)?;
        self.layout = layout;
        Ok(values)
    }

    async fn submit_update(
        &mut self,
        task: &Task,
        update: LocalUpdate,
        encoded: EncodedModel,
    ) -> Result<(), ClientError> {
        let header = pb::UpdateHeader {
            pseudonym: self.pseudonym.clone(),
            round: task.round(),
            model_version: task.model_version(),
            num_examples: update.num_examples,
            num_values: encoded.num_values() as u64,
            evaluation: update.evaluation.as_ref().map(pb::EvaluationCounts::from),
        };
        let chunks = encoded.update_chunks(header, self.chunk_bytes);
        for c in &chunks {
            self.sent.log("UpdateChunk", task.round(), c);
        }
        let sent = &mut self.sent;
        fedrec_proto::reserve_and_upload(&mut self.client, chunks, |header| {
            sent.log("UploadReservation", header.round, header);
        })
        .await
        .map_err(rpc("SubmitUpdate"))?;
        Ok(())
    }

    async fn submit_evaluation(
        &mut self,
        task: &Task,
        counts: Option<EvalCounts>,
    ) -> Result<(), ClientError> {
        let req = pb::EvaluationReport {
            pseudonym: self.pseudonym.clone(),
            round: task.round(),
            model_version: task.model_version(),
            counts: Some(pb::EvaluationCounts::from(&counts.unwrap_or_default())),
        };
        self.sent.log("EvaluationReport", task.round(), &req);
        self.client
            .submit_evaluation(req)
            .await
            .map_err(rpc("SubmitEvaluation"))?;
        Ok(())
    }
}

/// A task's output, ready for a plain upload.
enum Upload {
    /// The update (its `delta` emptied), and its values encoded for upload.
    Update(LocalUpdate, EncodedModel),
    Evaluation(Option<EvalCounts>),
}

impl Upload {
    /// Encodes an update's values in `encoding`. The encoding is what is
    /// sent: a device waiting for an upload slot holds one copy of its
    /// update, not two.
    fn new(output: TaskOutput, encoding: Encoding) -> Self {
        match output {
            TaskOutput::Update(mut update) => {
                let encoded = EncodedModel::for_upload(&update.delta, encoding);
                update.delta = Vec::new();
                Upload::Update(update, encoded)
            }
            TaskOutput::Evaluation(counts) => Upload::Evaluation(counts),
        }
    }
}

/// Which layouts a model download may have besides the one expected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OtherLayouts {
    /// None: another layout is a [`ClientError::ModelMismatch`].
    Refused,
    /// Any this SDK can build a model for ([`model::for_layout`]); another
    /// is a [`ClientError::ModelMismatch`] saying why.
    IfBuildable,
}

/// Reads a model download to its end and decodes it, whatever the
/// coordinator's encoding; returns its layout and values. A layout other
/// than `layout` is taken as `others` says; a malformed or incomplete
/// download is a [`ClientError::Protocol`] naming the problem.
pub(crate) async fn receive_model(
    stream: &mut tonic::Streaming<pb::ModelChunk>,
    layout: Layout,
    others: OtherLayouts,
) -> Result<(Layout, Vec<f32>), ClientError> {
    let mut download = Download::new(layout, others);
    while let Some(chunk) = stream.message().await.map_err(rpc("DownloadModel"))? {
        download.add(&chunk)?;
    }
    download.finish()
}

/// A model download being assembled: its layout is the expected one, or
/// the one its first chunk carries when [`OtherLayouts`] allows it.
struct Download {
    expected: Layout,
    others: OtherLayouts,
    /// Made at the first chunk, in the layout chosen then.
    model: Option<(Layout, ModelAssembler)>,
}

impl Download {
    fn new(expected: Layout, others: OtherLayouts) -> Self {
        Self {
            expected,
            others,
            model: None,
        }
    }

    /// Decodes the next chunk; the first one chooses the layout.
    fn add(&mut self, chunk: &pb::ModelChunk) -> Result<(), ClientError> {
        let (_, model) = match &mut self.model {
            Some(model) => model,
            None => {
                let layout = self.layout_for(chunk)?;
                self.model
                    .insert((layout.clone(), ModelAssembler::new(layout)))
            }
        };
        model.add(chunk).map_err(download_refused)
    }

    /// The layout to assemble a download starting with `first` in: the one
    /// it carries if it is another the device may take, else the expected
    /// one (which the assembler then holds it to).
    fn layout_for(&self, first: &pb::ModelChunk) -> Result<Layout, ClientError> {
        if first.offset != 0 || first.layout.is_empty() {
            return Ok(self.expected.clone());
        }
        let got = Layout::from_pb(&first.layout);
        if got == self.expected || self.others == OtherLayouts::Refused {
            return Ok(self.expected.clone());
        }
        model::for_layout(&got).map_err(|e| match e {
            ClientError::ModelMismatch(_) => e,
            e => ClientError::ModelMismatch(format!(
                "the coordinator's model ({got}) cannot be built on this device: {e}"
            )),
        })?;
        Ok(got)
    }

    /// The layout and the values, once every value has arrived.
    fn finish(self) -> Result<(Layout, Vec<f32>), ClientError> {
        let (layout, model) = self
            .model
            .unwrap_or_else(|| (self.expected.clone(), ModelAssembler::new(self.expected)));
        let values = model.finish().map_err(download_refused)?;
        Ok((layout, values))
    }
}

/// Makes `device` take a model downloaded in `layout`, if it is not its
/// own: its model replaced by one built for `layout`, its private
/// embedding started afresh at the new size, its catalogue kept
/// ([`Device::adopt_shape`]). A layout the SDK cannot build, or whose items
/// do not fit the catalogue or the stored purchases, is a
/// [`ClientError::ModelMismatch`] and changes nothing.
pub(crate) fn adopt_layout(device: &mut Device, layout: &Layout) -> Result<(), ClientError> {
    if device.model().layout() == *layout {
        return Ok(());
    }
    let catalogue = device.catalogue().cloned();
    device.adopt_shape(layout, catalogue)?;
    tracing::info!(%layout, "model shape changed by the coordinator; adopted");
    Ok(())
}

/// The device's error for a download it cannot use.
fn download_refused(e: CodecError) -> ClientError {
    match e {
        CodecError::LayoutMismatch { .. } => ClientError::ModelMismatch(e.to_string()),
        e => ClientError::Protocol(format!("model download: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_downloads_are_protocol_errors_naming_the_problem() {
        let layout = Layout::new(vec![("item_bias".into(), vec![2])]);
        let mut model = ModelAssembler::new(layout.clone());
        let chunk = pb::ModelChunk {
            values: bytes::Bytes::from_static(&[1, 2]),
            encoding: pb::ValueEncoding::Q8.into(),
            q8: Some(pb::Q8Blocks {
                block_values: 256,
                min: vec![0.0],
                scale: vec![f32::NAN],
            }),
            ..Default::default()
        };
        let err = download_refused(model.add(&chunk).unwrap_err());
        assert!(
            matches!(&err, ClientError::Protocol(m) if m.contains("q8 block 0") && m.contains("NaN")),
            "{err}"
        );
        let other = pb::ModelChunk {
            layout: Layout::new(vec![("item_bias".into(), vec![3])]).to_pb(),
            ..Default::default()
        };
        let err = download_refused(ModelAssembler::new(layout).add(&other).unwrap_err());
        assert!(matches!(err, ClientError::ModelMismatch(_)), "{err}");
    }

    /// The chunks a coordinator sends for `values` laid out as `layout`:
    /// the first carries the layout.
    fn download_chunks(layout: &Layout, values: &[f32]) -> Vec<pb::ModelChunk> {
        let mut chunks: Vec<pb::ModelChunk> = EncodedModel::new(values, Encoding::F32)
            .chunks(256)
            .collect();
        assert!(chunks.len() > 1);
        chunks[0].layout = layout.to_pb();
        chunks
    }

    fn assemble(
        expected: Layout,
        others: OtherLayouts,
        chunks: &[pb::ModelChunk],
    ) -> Result<(Layout, Vec<f32>), ClientError> {
        let mut download = Download::new(expected, others);
        for chunk in chunks {
            download.add(chunk)?;
        }
        download.finish()
    }

    fn federated_device(model: Arc<dyn crate::model::Model>) -> Device {
        let mut device = Device::new(model, 3);
        device
            .set_consent(crate::consent::Consent::Federated)
            .unwrap();
        for (item, time) in [(1, 0), (4, 1), (7, 2)] {
            device
                .record(crate::store::Purchase::new(item, time, 1.0))
                .unwrap();
        }
        device
    }

    #[test]
    fn a_download_of_another_buildable_layout_is_adopted() {
        use crate::model::{MatrixFactorization, Model};
        use rand::SeedableRng;
        let narrow = MatrixFactorization::new(20, 4, 0.1).unwrap();
        let mut device = federated_device(Arc::new(narrow.clone()));
        let before = device.private_embedding().to_vec();
        assert_eq!(before.len(), 4);

        // A trial of 16 factors, then one of federated EASE.
        let wide = MatrixFactorization::new(20, 16, 0.1).unwrap();
        let ease = crate::ease::Ease::new(20).unwrap();
        for (model, private) in [
            (&wide as &dyn Model, 16),
            (
                &ease as &dyn Model,
                ease.init_private(&mut rand_chacha::ChaCha8Rng::seed_from_u64(1))
                    .len(),
            ),
        ] {
            let layout = model.layout();
            let values = model.init_global(&mut rand_chacha::ChaCha8Rng::seed_from_u64(2));
            let chunks = download_chunks(&layout, &values);
            // The device's own layout is expected; the download's is taken.
            let (got, global) =
                assemble(device.model().layout(), OtherLayouts::IfBuildable, &chunks).unwrap();
            assert_eq!((&got, &global), (&layout, &values));
            // Where it is not allowed (the app's refresh), it is refused.
            let err =
                assemble(device.model().layout(), OtherLayouts::Refused, &chunks).unwrap_err();
            assert!(matches!(err, ClientError::ModelMismatch(_)), "{err}");

            adopt_layout(&mut device, &got).unwrap();
            assert_eq!(device.model().layout(), layout);
            assert_eq!(device.private_embedding().len(), private);
            assert_eq!(device.store().items(), [1, 4, 7], "purchases kept");
            let task = Task::for_tests(TaskKind::Train, 1);
            let TaskOutput::Update(update) = device.run_task(&task, &global).unwrap() else {
                panic!("a training task gives an update");
            };
            assert_eq!(update.delta.len(), values.len());
        }

        // The same layout again changes nothing.
        let private = device.private_embedding().to_vec();
        adopt_layout(&mut device, &ease.layout()).unwrap();
        assert_eq!(device.private_embedding(), private.as_slice());
    }

    #[test]
    fn a_download_of_a_layout_the_sdk_cannot_build_is_refused() {
        use crate::model::{MatrixFactorization, Model};
        let model = MatrixFactorization::new(20, 4, 0.1).unwrap();
        let device = federated_device(Arc::new(model.clone()));
        for (layout, says) in [
            (
                Layout::new(vec![("user_tower".into(), vec![20, 4])]),
                "user_tower",
            ),
            (
                Layout::new(vec![
                    ("item_factors".into(), vec![20, 2000]),
                    ("item_bias".into(), vec![20]),
                ]),
                "factors must be in 1..=1024",
            ),
        ] {
            let values = vec![0.5; 600];
            let err = assemble(
                device.model().layout(),
                OtherLayouts::IfBuildable,
                &download_chunks(&layout, &values),
            )
            .unwrap_err();
            assert!(
                matches!(&err, ClientError::ModelMismatch(m) if m.contains(says)),
                "{err}"
            );
        }
        // And a buildable model whose items do not fit the stored purchases
        // is refused when adopted, changing nothing.
        let mut device = device;
        let small = MatrixFactorization::new(5, 4, 0.1).unwrap().layout();
        let err = adopt_layout(&mut device, &small).unwrap_err();
        assert!(matches!(err, ClientError::ModelMismatch(_)), "{err}");
        assert_eq!(device.model().layout(), model.layout());
    }
}
