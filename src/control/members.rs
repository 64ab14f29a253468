//! Membership endpoints of the control API: list, add (as a learner), promote (optionally
//! replacing another member in one joint change), and remove.
//!
//! A member joins in two steps so that it never weakens the quorum while it is empty: it is
//! added as a learner (it receives the log and, when the log no longer reaches back far
//! enough, a snapshot, but does not vote), and promoted only once the leader sees it caught
//! up. A replace promotes the new member and removes the old one in one ConfChangeV2, which
//! raft-rs runs as joint consensus (both majorities must agree until the group leaves the
//! joint configuration on its own).
//!
//! Only the leader proposes membership changes (see `ProposeConfChange`); any other node
//! answers 421 naming the leader's control address, and clients retry there.
//!
//! No check here is made on a status read before the change and then trusted: whatever must
//! hold for a change (a learner close to the commit index, a quorum left after a removal, the
//! members' roles) travels with it as a `ConfChangeCheck` that the Raft actor judges in the
//! step that proposes it. A check that fails may hold a moment later (writes going on keep a
//! learner a few hundred entries behind at times; the previous change may still be applying),
//! so the endpoint asks again until its wait runs out, and only then refuses, saying why.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use raft::prelude::{ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::{error_response, raft_status, ControlState};
use crate::actors::messages::{
    ConfChangeCheck, PeerProgress, ProposalError, ProposeConfChange, RaftStatus, TransferLeader,
};
use crate::config::MemberConfig;

/// A learner is promoted only when the leader has replicated to it within this many entries
/// of the commit index (and replicates to it steadily): a voter further behind would make
/// every write wait for it to catch up.
pub const PROMOTE_LAG_ENTRIES_MAX: u64 = 256;

/// The directory is carried in every snapshot and status document: keep it small.
pub const MEMBERS_MAX: usize = 15;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberView {
    #[serde(flatten)]
    pub member: MemberConfig,
    /// "voter", "learner", "outgoing voter" (being removed by a joint change) or "unknown"
    /// (in the directory but not in this node's configuration).
    pub role: String,
    /// The leader's replication progress to this member (on the leader only).
    pub progress: Option<PeerProgressView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerProgressView {
    pub matched: u64,
    pub next_index: u64,
    pub state: String,
    pub recent_active: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MembersBody {
    pub node_id: u64,
    pub leader_id: u64,
    pub commit_index: u64,
    pub members: Vec<MemberView>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PromoteRequest {
    /// Remove this member in the same (joint) change.
    #[serde(default)]
    pub replace: Option<u64>,
    /// How long the leader may wait for the learner to be close enough to the commit index
    /// (writes going on can keep it a little behind at any one instant);
    /// [`PROMOTE_WAIT_DEFAULT`] when absent, at most [`PROMOTE_WAIT_MAX`].
    #[serde(default)]
    pub wait_ms: Option<u64>,
}

/// How long a promotion waits for its learner when the request does not say.
pub const PROMOTE_WAIT_DEFAULT: Duration = Duration::from_secs(10);
/// The longest a promotion request waits for its learner. The change may then still wait
/// for its commit (the request timeout, 30 s by default), and clients give up on a request
/// after a minute: a longer wait is asked for again by the client.
pub const PROMOTE_WAIT_MAX: Duration = Duration::from_secs(25);
/// How long any membership change waits for the previous one to finish applying (a replace's
/// joint configuration is left by a second entry, right after the first).
const PREVIOUS_CHANGE_WAIT: Duration = Duration::from_secs(10);
/// Pause between two attempts at a change whose condition did not hold.
const CHANGE_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// The 409 body of a promotion that timed out waiting for its learner: the error, and how far
/// behind the learner was at the end.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NotCaughtUpBody {
    pub error: String,
    pub matched: u64,
    pub commit_index: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ForceQuery {
    /// Skip the check that the remaining voters still form a working quorum.
    #[serde(default)]
    pub force: bool,
}

/// The 421 body: where the leader's control API is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NotLeaderBody {
    pub error: String,
    pub leader_id: u64,
    pub leader_control: Option<String>,
}

fn role_of(status: &RaftStatus, id: u64) -> &'static str {
    if status.voters.contains(&id) {
        "voter"
    } else if status.learners.contains(&id) {
        "learner"
    } else if status.voters_outgoing.contains(&id) {
        "outgoing voter"
    } else {
        "unknown"
    }
}

fn progress_of(status: &RaftStatus, id: u64) -> Option<&PeerProgress> {
    status.peers.iter().find(|peer| peer.id == id)
}

fn members_body(state: &ControlState, status: &RaftStatus) -> MembersBody {
    let members = state
        .log_store
        .members()
        .into_iter()
        .map(|member| MemberView {
            role: role_of(status, member.id).to_string(),
            progress: progress_of(status, member.id).map(|progress| PeerProgressView {
                matched: progress.matched,
                next_index: progress.next_index,
                state: progress.state.clone(),
                recent_active: progress.recent_active,
            }),
            member,
        })
        .collect();
    MembersBody {
        node_id: status.node_id,
        leader_id: status.leader_id,
        commit_index: status.commit_index,
        members,
    }
}

fn not_leader(state: &ControlState, leader_id: u64) -> HttpResponse {
    let leader_control = state
        .log_store
        .members()
        .into_iter()
        .find(|member| member.id == leader_id && leader_id != 0)
        .map(|member| member.control);
    HttpResponse::build(StatusCode::MISDIRECTED_REQUEST).json(NotLeaderBody {
        error: format!("membership changes go to the leader (node {leader_id})"),
        leader_id,
        leader_control,
    })
}

/// What must hold for a planned change (see [`Plan`]).
pub type PlanCheck = Arc<dyn Fn(&RaftStatus) -> Result<(), String> + Send + Sync>;

/// A membership change ready to propose on the leader: the change, and what must hold for it,
/// judged on the leader's live state in the step that proposes it. Planning is pure: the
/// endpoints below and the Raft simulation plan with the same functions.
#[derive(Clone)]
pub struct Plan {
    pub change: ConfChangeV2,
    pub check: PlanCheck,
}

impl Plan {
    /// The check, as the Raft core takes it.
    pub fn boxed_check(&self) -> ConfChangeCheck {
        let check = self.check.clone();
        Box::new(move |status: &RaftStatus| check(status))
    }
}

/// Why a change cannot be planned on this status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanRefusal {
    /// The change makes no sense for the group as it is (409, with the reason).
    Conflict(String),
    /// The change would remove the leader itself: leadership has to move first.
    LeaderMustMove,
}

/// Adds `member` as a learner. `members_known`: members in this node's directory.
pub fn plan_add_learner(
    status: &RaftStatus,
    members_known: usize,
    member: &MemberConfig,
) -> Result<Plan, PlanRefusal> {
    if members_known >= MEMBERS_MAX {
        return Err(PlanRefusal::Conflict(format!(
            "the group already has {MEMBERS_MAX} members"
        )));
    }
    let id = member.id;
    if role_of(status, id) != "unknown" {
        return Err(PlanRefusal::Conflict(format!(
            "node {id} is already a {} of the group",
            role_of(status, id)
        )));
    }
    let context = serde_json::to_vec(member).expect("member records serialize");
    Ok(Plan {
        change: change_of(vec![single(ConfChangeType::AddLearnerNode, id)], context),
        check: Arc::new(move |status: &RaftStatus| match role_of(status, id) {
            "unknown" => Ok(()),
            role => Err(format!("node {id} became a {role} of the group meanwhile")),
        }),
    })
}

/// Promotes learner `id`, removing voter `replace` in the same joint change.
pub fn plan_promote(
    status: &RaftStatus,
    id: u64,
    replace: Option<u64>,
) -> Result<Plan, PlanRefusal> {
    if role_of(status, id) != "learner" {
        return Err(PlanRefusal::Conflict(format!(
            "node {id} is not a learner (it is {}); add it first",
            role_of(status, id)
        )));
    }
    let mut changes = vec![single(ConfChangeType::AddNode, id)];
    if let Some(old) = replace {
        if role_of(status, old) != "voter" {
            return Err(PlanRefusal::Conflict(format!(
                "node {old} is not a voter; nothing to replace"
            )));
        }
        if old == status.node_id {
            return Err(PlanRefusal::LeaderMustMove);
        }
        changes.push(single(ConfChangeType::RemoveNode, old));
    }
    Ok(Plan {
        change: change_of(changes, Vec::new()),
        check: Arc::new(move |status: &RaftStatus| {
            learner_caught_up(status, id)?;
            match replace {
                Some(old) if role_of(status, old) != "voter" => {
                    Err(format!("node {old} is no longer a voter"))
                }
                _ => Ok(()),
            }
        }),
    })
}

/// Removes voter or learner `id`; `force` skips the check that the remaining voters still
/// form a working quorum.
pub fn plan_remove(status: &RaftStatus, id: u64, force: bool) -> Result<Plan, PlanRefusal> {
    match role_of(status, id) {
        "voter" => {
            if let Err(problem) = quorum_survives(status, id, None) {
                if !force {
                    return Err(PlanRefusal::Conflict(problem));
                }
            }
            if id == status.node_id {
                return Err(PlanRefusal::LeaderMustMove);
            }
        }
        "learner" => {}
        role => {
            return Err(PlanRefusal::Conflict(format!(
                "node {id} is not a voter or learner of the group ({role})"
            )))
        }
    }
    Ok(Plan {
        change: change_of(vec![single(ConfChangeType::RemoveNode, id)], Vec::new()),
        // The quorum is judged again in the step that proposes: a voter may have gone quiet
        // since.
        check: Arc::new(move |status: &RaftStatus| {
            if role_of(status, id) == "voter" && !force {
                quorum_survives(status, id, None)?;
            }
            Ok(())
        }),
    })
}

/// The answer to a change that could not be planned.
async fn refused(
    state: &ControlState,
    status: &RaftStatus,
    id: u64,
    refusal: PlanRefusal,
) -> HttpResponse {
    match refusal {
        PlanRefusal::Conflict(reason) => error_response(StatusCode::CONFLICT, reason),
        PlanRefusal::LeaderMustMove => move_leadership_away(state, status, id).await,
    }
}

async fn leader_status(state: &ControlState) -> Result<RaftStatus, HttpResponse> {
    let Some(status) = raft_status(state).await else {
        return Err(error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "the Raft actor is restarting",
        ));
    };
    if status.leader_id != status.node_id {
        return Err(not_leader(state, status.leader_id));
    }
    Ok(status)
}

/// Proposes `change` on this node (the leader), with `check` judged by the Raft actor in the
/// same step as the proposal (see [`ProposeConfChange::check`]). While the change is not
/// possible yet (its check fails, or the previous change is still being applied) it asks
/// again until `wait` has passed; then the last reason is the answer.
async fn propose_change(
    state: &ControlState,
    plan: Plan,
    wait: Duration,
) -> Result<u64, ChangeRefusal> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let (responder, answer) = oneshot::channel();
        state
            .raft
            .send(ProposeConfChange {
                change: plan.change.clone(),
                check: Some(plan.boxed_check()),
                responder,
            })
            .await
            .map_err(|_| {
                ChangeRefusal::Response(error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the Raft actor is restarting",
                ))
            })?;
        let outcome = tokio::time::timeout(state.request_timeout, answer)
            .await
            .map_err(|_| {
                ChangeRefusal::Response(error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the membership change was not committed in time; check `raftblk ctl members`",
                ))
            })?;
        let refusal = match outcome {
            Ok(Ok(_)) => return Ok(state.log_store.conf_state_index()),
            Ok(Err(ProposalError::ConfChangeNotReady(reason))) => {
                if tokio::time::Instant::now() + CHANGE_RETRY_PAUSE < deadline {
                    tokio::time::sleep(CHANGE_RETRY_PAUSE).await;
                    continue;
                }
                ChangeRefusal::NotReady(reason)
            }
            Ok(Err(ProposalError::NotLeader { leader_id })) => {
                ChangeRefusal::Response(not_leader(state, leader_id))
            }
            Ok(Err(ProposalError::ConfChangeRefused(reason))) => {
                ChangeRefusal::Response(error_response(StatusCode::CONFLICT, reason))
            }
            Ok(Err(error)) => ChangeRefusal::Response(error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the membership change was not committed: {error}; retry"),
            )),
            Err(_) => ChangeRefusal::Response(error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "the Raft actor restarted before the change committed; retry",
            )),
        };
        return Err(refusal);
    }
}

/// Why [`propose_change`] did not propose: the condition still failed when its wait ran out
/// (the reason), or an answer for the client.
enum ChangeRefusal {
    NotReady(String),
    Response(HttpResponse),
}

impl ChangeRefusal {
    fn into_response(self) -> HttpResponse {
        match self {
            ChangeRefusal::NotReady(reason) => error_response(StatusCode::CONFLICT, reason),
            ChangeRefusal::Response(response) => response,
        }
    }
}

/// The answer to a change that committed: the member list as it is now.
async fn changed(state: &ControlState) -> HttpResponse {
    match raft_status(state).await {
        Some(status) => HttpResponse::Ok().json(members_body(state, &status)),
        None => HttpResponse::Ok().finish(),
    }
}

fn single(change_type: ConfChangeType, node_id: u64) -> ConfChangeSingle {
    let mut change = ConfChangeSingle::default();
    change.set_change_type(change_type);
    change.node_id = node_id;
    change
}

fn change_of(changes: Vec<ConfChangeSingle>, context: Vec<u8>) -> ConfChangeV2 {
    let mut change = ConfChangeV2::default();
    if changes.len() > 1 {
        // Joint consensus, left by the leader as soon as the joint configuration applies.
        change.set_transition(ConfChangeTransition::Implicit);
    }
    change.set_changes(changes.into());
    change.context = context.into();
    change
}

/// Whether the voters left after removing `removed` (and adding `added`) would still have a
/// majority that the leader hears from.
fn quorum_survives(status: &RaftStatus, removed: u64, added: Option<u64>) -> Result<(), String> {
    let remaining: Vec<u64> = status
        .voters
        .iter()
        .copied()
        .filter(|id| *id != removed)
        .chain(added)
        .collect();
    let healthy = remaining
        .iter()
        .filter(|id| {
            **id == status.node_id
                || progress_of(status, **id)
                    .is_some_and(|progress| progress.recent_active && progress.state == "Replicate")
        })
        .count();
    if healthy * 2 > remaining.len() {
        Ok(())
    } else {
        Err(format!(
            "only {healthy} of the {} remaining voters are replicating: the group would lose \
             its quorum (pass force=true to do it anyway)",
            remaining.len()
        ))
    }
}

async fn list_members(state: web::Data<ControlState>) -> HttpResponse {
    match raft_status(&state).await {
        Some(status) => HttpResponse::Ok().json(members_body(&state, &status)),
        None => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "the Raft actor is restarting",
        ),
    }
}

/// Whether learner `id` may be promoted now: the leader replicates to it steadily and has
/// replicated within [`PROMOTE_LAG_ENTRIES_MAX`] entries of the commit index.
fn learner_caught_up(status: &RaftStatus, id: u64) -> Result<(), String> {
    if role_of(status, id) != "learner" {
        return Err(format!("node {id} is no longer a learner"));
    }
    match progress_of(status, id) {
        Some(progress)
            if progress.state == "Replicate"
                && progress.recent_active
                && progress.matched + PROMOTE_LAG_ENTRIES_MAX >= status.commit_index =>
        {
            Ok(())
        }
        Some(progress) => Err(format!(
            "node {id} is {} entries behind the commit index {} (promoted within \
             {PROMOTE_LAG_ENTRIES_MAX}; replication state {}{})",
            status.commit_index.saturating_sub(progress.matched),
            status.commit_index,
            progress.state,
            if progress.recent_active {
                ""
            } else {
                ", not heard from within an election timeout"
            }
        )),
        None => Err(format!(
            "the leader has no replication progress for node {id}"
        )),
    }
}

async fn add_member(state: web::Data<ControlState>, body: web::Json<MemberConfig>) -> HttpResponse {
    let member = body.into_inner();
    if let Err(problem) = member.validate() {
        return error_response(StatusCode::BAD_REQUEST, problem);
    }
    let status = match leader_status(&state).await {
        Ok(status) => status,
        Err(response) => return response,
    };
    let plan = match plan_add_learner(&status, state.log_store.members().len(), &member) {
        Ok(plan) => plan,
        Err(refusal) => return refused(&state, &status, member.id, refusal).await,
    };
    match propose_change(&state, plan, PREVIOUS_CHANGE_WAIT).await {
        Ok(_) => changed(&state).await,
        Err(refusal) => refusal.into_response(),
    }
}

/// Promotes a learner, optionally replacing a voter in the same joint change. The learner's
/// lag is judged by the Raft actor at the moment it proposes (see [`propose_change`]); while
/// writes go on the learner may be a little behind at any one instant, so the request waits
/// for a moment when it is close enough, up to its `wait_ms`. If none comes, the answer says
/// how far behind the learner is and whether it is falling further behind.
async fn promote_member(
    state: web::Data<ControlState>,
    id: web::Path<u64>,
    body: Option<web::Json<PromoteRequest>>,
) -> HttpResponse {
    let id = id.into_inner();
    let request = body.map(|body| body.into_inner()).unwrap_or_default();
    let wait = request
        .wait_ms
        .map(Duration::from_millis)
        .unwrap_or(PROMOTE_WAIT_DEFAULT)
        .min(PROMOTE_WAIT_MAX);
    let status = match leader_status(&state).await {
        Ok(status) => status,
        Err(response) => return response,
    };
    let plan = match plan_promote(&status, id, request.replace) {
        Ok(plan) => plan,
        Err(refusal) => {
            let old = request.replace.unwrap_or(id);
            return refused(&state, &status, old, refusal).await;
        }
    };
    let before = LearnerSample::take(&state, id).await;
    match propose_change(&state, plan, wait).await {
        Ok(_) => changed(&state).await,
        Err(ChangeRefusal::NotReady(reason)) => {
            let after = LearnerSample::take(&state, id).await;
            let mut error = format!("node {id} was not promoted within {wait:?}: {reason}");
            if let (Some(before), Some(after)) = (&before, &after) {
                error.push_str(&before.trend_until(after));
            }
            let (matched, commit_index) = after
                .map(|sample| (sample.matched, sample.commit_index))
                .unwrap_or_default();
            HttpResponse::Conflict().json(NotCaughtUpBody {
                error,
                matched,
                commit_index,
            })
        }
        Err(ChangeRefusal::Response(response)) => response,
    }
}

/// A learner's replication progress and the commit index at one instant, to tell an operator
/// whether the learner keeps up with the writes.
struct LearnerSample {
    at: std::time::Instant,
    matched: u64,
    commit_index: u64,
}

impl LearnerSample {
    async fn take(state: &ControlState, id: u64) -> Option<LearnerSample> {
        let status = raft_status(state).await?;
        let progress = progress_of(&status, id)?;
        Some(LearnerSample {
            at: std::time::Instant::now(),
            matched: progress.matched,
            commit_index: status.commit_index,
        })
    }

    /// "; over the last N s it replicated X entries/s while the group committed Y/s …".
    fn trend_until(&self, later: &LearnerSample) -> String {
        let seconds = later.at.duration_since(self.at).as_secs_f64().max(0.001);
        let replicated = later.matched.saturating_sub(self.matched) as f64 / seconds;
        let committed = later.commit_index.saturating_sub(self.commit_index) as f64 / seconds;
        let verdict = if replicated < committed {
            ": it falls further behind, so its disk or its link is slower than the write rate"
        } else {
            ""
        };
        format!(
            "; over the last {seconds:.1} s it replicated {replicated:.0} entries/s while the \
             group committed {committed:.0} entries/s{verdict}"
        )
    }
}

/// The leader does not remove itself: it hands leadership to the most caught-up other
/// voter and asks the caller to retry there.
async fn move_leadership_away(state: &ControlState, status: &RaftStatus, id: u64) -> HttpResponse {
    let target = status
        .voters
        .iter()
        .filter(|voter| **voter != id)
        .filter_map(|voter| progress_of(status, *voter))
        .filter(|progress| progress.recent_active && progress.state == "Replicate")
        .max_by_key(|progress| progress.matched)
        .map(|progress| progress.id);
    let Some(target) = target else {
        return error_response(
            StatusCode::CONFLICT,
            "no other voter is replicating; the leader cannot step aside",
        );
    };
    match state.raft.send(TransferLeader { to: target }).await {
        Ok(Ok(())) => HttpResponse::build(StatusCode::SERVICE_UNAVAILABLE)
            .insert_header(("Retry-After", "1"))
            .json(NotLeaderBody {
                error: format!(
                    "node {id} leads; leadership is moving to node {target}: retry there"
                ),
                leader_id: target,
                leader_control: state
                    .log_store
                    .members()
                    .into_iter()
                    .find(|member| member.id == target)
                    .map(|member| member.control),
            }),
        Ok(Err(error)) => error_response(StatusCode::CONFLICT, error.to_string()),
        Err(_) => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "the Raft actor is restarting",
        ),
    }
}

async fn remove_member(
    state: web::Data<ControlState>,
    id: web::Path<u64>,
    query: web::Query<ForceQuery>,
) -> HttpResponse {
    let id = id.into_inner();
    let status = match leader_status(&state).await {
        Ok(status) => status,
        Err(response) => return response,
    };
    let plan = match plan_remove(&status, id, query.force) {
        Ok(plan) => plan,
        Err(refusal) => return refused(&state, &status, id, refusal).await,
    };
    match propose_change(&state, plan, PREVIOUS_CHANGE_WAIT).await {
        Ok(_) => changed(&state).await,
        Err(refusal) => refusal.into_response(),
    }
}

/// Registers the membership routes.
pub fn configure(config: &mut web::ServiceConfig) {
    config
        .route("/v1/members", web::get().to(list_members))
        .route("/v1/members", web::post().to(add_member))
        .route("/v1/members/{id}/promote", web::post().to(promote_member))
        .route("/v1/members/{id}", web::delete().to(remove_member));
}

/// How long a client keeps retrying a membership call that was redirected or asked to
/// retry (leader moving, election).
const CLIENT_RETRY_WINDOW: Duration = Duration::from_secs(30);

/// Errors of the membership client, phrased for the person at the terminal.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("no server answered at {addresses}: the cluster is unreachable")]
    Unreachable { addresses: String },
    #[error("the servers answered but none knows a leader: the group has no quorum")]
    NoLeader,
    #[error("{0}")]
    Refused(String),
    #[error("node {id} did not catch up within {waited:?} (matched {matched} of {commit})")]
    CatchUpTimedOut {
        id: u64,
        waited: Duration,
        matched: u64,
        commit: u64,
    },
    /// The leader waited for the learner as long as it was asked to; the message says how far
    /// behind it was.
    #[error("{0}")]
    NotCaughtUp(String),
}

/// Drives membership changes from `raftblk ctl members`: finds the leader through any of the
/// given control addresses (and every member's, once known), follows redirects, retries while
/// leadership moves.
pub struct MembershipClient {
    controls: parking_lot::Mutex<Vec<String>>,
    agent: ureq::Agent,
    token: Option<String>,
}

impl MembershipClient {
    pub fn new(controls: &[String], token: Option<String>) -> Self {
        MembershipClient {
            controls: parking_lot::Mutex::new(controls.to_vec()),
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(60))
                .build(),
            token,
        }
    }

    fn request(&self, method: &str, url: &str) -> ureq::Request {
        let request = self.agent.request(method, url);
        match &self.token {
            Some(token) => request.set("Authorization", &format!("Bearer {token}")),
            None => request,
        }
    }

    /// The member list as the leader (or, without one, any server) sees it.
    pub fn members(&self) -> Result<MembersBody, MembershipError> {
        let controls = self.controls.lock().clone();
        let mut best: Option<MembersBody> = None;
        for control in &controls {
            let Ok(response) = self
                .request("GET", &format!("http://{control}/v1/members"))
                .timeout(Duration::from_secs(3))
                .call()
            else {
                continue;
            };
            let Ok(body) = response.into_json::<MembersBody>() else {
                continue;
            };
            let is_leader = body.leader_id != 0 && body.leader_id == body.node_id;
            if is_leader {
                best = Some(body);
                break;
            }
            if best.is_none() {
                best = Some(body);
            }
        }
        let body = best.ok_or_else(|| MembershipError::Unreachable {
            addresses: controls.join(", "),
        })?;
        let mut known = self.controls.lock();
        for view in &body.members {
            if !known.contains(&view.member.control) {
                known.push(view.member.control.clone());
            }
        }
        Ok(body)
    }

    fn leader_control(&self) -> Result<String, MembershipError> {
        let body = self.members()?;
        if body.leader_id == 0 {
            return Err(MembershipError::NoLeader);
        }
        body.members
            .iter()
            .find(|view| view.member.id == body.leader_id)
            .map(|view| view.member.control.clone())
            .ok_or(MembershipError::NoLeader)
    }

    /// Sends a change to the leader, following redirects and retrying while leadership moves.
    fn change(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<MembersBody, MembershipError> {
        let started = std::time::Instant::now();
        loop {
            let last_error = match self.leader_control() {
                Ok(control) => {
                    let request = self.request(method, &format!("http://{control}{path}"));
                    let result = match &body {
                        Some(body) => request.send_json(body.clone()),
                        None => request.call(),
                    };
                    match result {
                        Ok(response) => {
                            return response
                                .into_json()
                                .map_err(|error| MembershipError::Refused(error.to_string()))
                        }
                        Err(ureq::Error::Status(code, response)) => {
                            let text = response.into_string().unwrap_or_default();
                            if let Ok(body) = serde_json::from_str::<NotCaughtUpBody>(&text) {
                                return Err(MembershipError::NotCaughtUp(body.error));
                            }
                            let message = serde_json::from_str::<serde_json::Value>(&text)
                                .ok()
                                .and_then(|value| value["error"].as_str().map(str::to_string))
                                .unwrap_or(text);
                            if code != 421 && code != 503 {
                                return Err(MembershipError::Refused(message));
                            }
                            MembershipError::Refused(message)
                        }
                        Err(error) => MembershipError::Refused(error.to_string()),
                    }
                }
                Err(error) => error,
            };
            if started.elapsed() > CLIENT_RETRY_WINDOW {
                return Err(last_error);
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Adds `member` as a learner.
    pub fn add_learner(&self, member: &MemberConfig) -> Result<MembersBody, MembershipError> {
        self.change(
            "POST",
            "/v1/members",
            Some(serde_json::to_value(member).expect("member records serialize")),
        )
    }

    /// Waits until the leader has replicated to learner `id` within
    /// [`PROMOTE_LAG_ENTRIES_MAX`] of its commit index, reporting (matched, commit) as it goes.
    pub fn wait_caught_up(
        &self,
        id: u64,
        timeout: Duration,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<Duration, MembershipError> {
        let started = std::time::Instant::now();
        let mut last = (0, 0);
        loop {
            if let Ok(body) = self.members() {
                if let Some(view) = body.members.iter().find(|view| view.member.id == id) {
                    if let Some(state) = &view.progress {
                        last = (state.matched, body.commit_index);
                        progress(state.matched, body.commit_index);
                        if state.state == "Replicate"
                            && state.recent_active
                            && state.matched + PROMOTE_LAG_ENTRIES_MAX >= body.commit_index
                        {
                            return Ok(started.elapsed());
                        }
                    }
                }
            }
            if started.elapsed() > timeout {
                return Err(MembershipError::CatchUpTimedOut {
                    id,
                    waited: started.elapsed(),
                    matched: last.0,
                    commit: last.1,
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Promotes learner `id` to voter, removing `replace` in the same joint change. The leader
    /// waits up to `wait` for a moment when the learner is close enough to the commit index;
    /// while `timeout` has not passed, a promotion that found none is asked for again, with
    /// `progress` called on the learner's (matched, commit) meanwhile.
    pub fn promote(
        &self,
        id: u64,
        replace: Option<u64>,
        timeout: Duration,
        mut progress: impl FnMut(u64, u64) + Send,
    ) -> Result<MembersBody, MembershipError> {
        let started = std::time::Instant::now();
        loop {
            let wait = timeout
                .saturating_sub(started.elapsed())
                .min(PROMOTE_WAIT_MAX);
            let request = PromoteRequest {
                replace,
                wait_ms: Some(wait.as_millis() as u64),
            };
            let finished = std::sync::atomic::AtomicBool::new(false);
            let result = std::thread::scope(|scope| {
                // Progress while the leader holds the request.
                scope.spawn(|| {
                    while !finished.load(std::sync::atomic::Ordering::Acquire) {
                        if let Ok(body) = self.members() {
                            if let Some(state) = body
                                .members
                                .iter()
                                .find(|view| view.member.id == id)
                                .and_then(|view| view.progress.as_ref())
                            {
                                progress(state.matched, body.commit_index);
                            }
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                });
                let result = self.change(
                    "POST",
                    &format!("/v1/members/{id}/promote"),
                    Some(serde_json::to_value(&request).expect("serializes")),
                );
                finished.store(true, std::sync::atomic::Ordering::Release);
                result
            });
            match result {
                Err(MembershipError::NotCaughtUp(_)) if started.elapsed() < timeout => continue,
                result => return result,
            }
        }
    }

    /// Removes member `id` (a leader steps aside first).
    pub fn remove(&self, id: u64, force: bool) -> Result<MembersBody, MembershipError> {
        self.change("DELETE", &format!("/v1/members/{id}?force={force}"), None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(voters: &[u64], peers: &[(u64, bool, &str)]) -> RaftStatus {
        RaftStatus {
            group_id: 1,
            node_id: 1,
            role: "Leader".into(),
            term: 2,
            leader_id: 1,
            commit_index: 100,
            applied_index: 100,
            first_log_index: 1,
            last_log_index: 100,
            proposals_pending: 0,
            snapshots_sent: 0,
            lease_reads: 0,
            snapshots_installed: 0,
            peers: peers
                .iter()
                .map(|(id, active, state)| PeerProgress {
                    id: *id,
                    matched: 100,
                    next_index: 101,
                    state: state.to_string(),
                    recent_active: *active,
                })
                .collect(),
            voters: voters.to_vec(),
            learners: Vec::new(),
            voters_outgoing: Vec::new(),
            health_problem: None,
        }
    }

    #[test]
    fn removing_a_voter_needs_a_replicating_majority_of_the_rest() {
        let healthy = status(
            &[1, 2, 3],
            &[(2, true, "Replicate"), (3, true, "Replicate")],
        );
        assert!(quorum_survives(&healthy, 3, None).is_ok());
        // 3 is down: removing 2 leaves {1, 3} with only the leader replicating.
        let one_down = status(&[1, 2, 3], &[(2, true, "Replicate"), (3, false, "Probe")]);
        assert!(quorum_survives(&one_down, 2, None).is_err());
        // Removing the dead one is what an operator wants, and it is safe.
        assert!(quorum_survives(&one_down, 3, None).is_ok());
    }

    #[test]
    fn a_replace_is_one_joint_change_and_a_single_change_is_simple() {
        let joint = change_of(
            vec![
                single(ConfChangeType::AddNode, 4),
                single(ConfChangeType::RemoveNode, 3),
            ],
            Vec::new(),
        );
        assert_eq!(joint.enter_joint(), Some(true));
        let simple = change_of(vec![single(ConfChangeType::AddLearnerNode, 4)], Vec::new());
        assert_eq!(simple.enter_joint(), None);
    }
}
