//! The HTTP control API of a server (actix-web), and the client the `raftblk volume …`
//! commands use to call it.
//!
//! - `GET /health`: 200 while this node is in a working quorum and caught up (it knows a
//!   leader, heard from it within an election timeout, and applied an entry of the current
//!   term); 503 otherwise, with the reason (`{"healthy", "reason", "raft"}`).
//! - `GET /metrics`: Prometheus text exposition (see `control::metrics`).
//! - `GET /v1/status`: Raft state (with the followers' progress on the leader), the cluster's
//!   members and their addresses, volumes and actor restart counts as JSON.
//! - `GET /v1/volumes`, `POST /v1/volumes` (`{"name", "size_bytes", "block_size_bytes"}`),
//!   `DELETE /v1/volumes/{name}`: the volume table, changed through Raft like any write.
//! - `POST /v1/volumes/{name}/attach` (`{"client", "force", "attach_id"}`) and
//!   `DELETE /v1/volumes/{name}/attach?epoch=N`: the single read-write attachment of a volume
//!   and its fencing epoch (see `storage::command::Command::Attach`).
//! - `GET /v1/volumes/{name}/digest`: a checksum of this node's own copy, to compare replicas.
//! - `POST /v1/volumes/{name}/resize` (`{"size_bytes"}`): grows a volume online; new NBD
//!   connections see the new size. Shrinking is refused (409).
//!
//! Every request but GET and HEAD needs `Authorization: Bearer <control.token>` (see
//! [`auth`]).

pub mod auth;
pub mod metrics;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
pub mod members;

use actix_web::{web, HttpResponse};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::actors::messages::StorageRequestError;
use crate::actors::messages::{GetRaftStatus, RaftStatus};
use crate::actors::raft::{propose_until, RaftActor};
use crate::actors::storage::{ComputeVolumeDigest, StorageActor, VolumeDigest, VolumeRegistry};
use crate::actors::supervisor::{RestartCounters, RestartCounts};
use crate::config::{validate_volume_geometry, MemberConfig};
use crate::storage::command::{encode_command, Command};
use crate::storage::raft_log::RaftLogStore;
use crate::storage::state_machine::{ApplyOutcome, ApplyRejection, VolumeInfo};

/// Shared state of the control API handlers.
pub struct ControlState {
    pub raft: Addr<RaftActor>,
    pub registry: VolumeRegistry,
    pub restarts: Arc<RestartCounters>,
    pub request_timeout: Duration,
    pub storage: Addr<StorageActor>,
    /// Holds the member directory (empty for a one-voter group without `cluster.members`).
    pub log_store: RaftLogStore,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttachRequest {
    pub client: String,
    #[serde(default)]
    pub force: bool,
    /// Names one attach request across its retries (see `Command::Attach`): a caller that
    /// retries, here or at another server, sends the same id.
    #[serde(default)]
    pub attach_id: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttachReply {
    pub volume: VolumeInfo,
    pub epoch: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DetachQuery {
    pub epoch: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateVolumeRequest {
    pub name: String,
    pub size_bytes: u64,
    #[serde(default = "default_block_size_bytes")]
    pub block_size_bytes: u32,
}

fn default_block_size_bytes() -> u32 {
    4096
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResizeVolumeRequest {
    pub size_bytes: u64,
}

/// The body of `GET /health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealthBody {
    pub healthy: bool,
    /// Why not healthy; absent when healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default)]
    pub raft: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatusBody {
    pub raft: RaftStatus,
    pub members: Vec<MemberConfig>,
    pub volumes: Vec<VolumeInfo>,
    pub actor_restarts: RestartCounts,
    /// This server's process id (a drill kills it by this).
    pub pid: u32,
}

fn error_response(status: actix_web::http::StatusCode, message: impl Into<String>) -> HttpResponse {
    HttpResponse::build(status).json(ErrorBody {
        error: message.into(),
    })
}

/// Names become NBD export names and file-free RocksDB values: printable, bounded.
fn validate_volume_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 {
        return Err("a volume name must be 1 to 255 bytes".to_string());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err("a volume name may hold only ASCII letters, digits, '-', '_' and '.'".into());
    }
    Ok(())
}

async fn raft_status(state: &ControlState) -> Option<RaftStatus> {
    state.raft.send(GetRaftStatus).await.ok()
}

async fn health(state: web::Data<ControlState>) -> HttpResponse {
    match raft_status(&state).await {
        Some(status) => {
            let reason = status.health_problem.clone();
            let body = HealthBody {
                healthy: reason.is_none(),
                reason,
                raft: serde_json::to_value(&status).unwrap_or_default(),
            };
            if body.healthy {
                HttpResponse::Ok().json(body)
            } else {
                HttpResponse::ServiceUnavailable().json(body)
            }
        }
        None => HttpResponse::ServiceUnavailable().json(HealthBody {
            healthy: false,
            reason: Some("the Raft actor is restarting".to_string()),
            raft: serde_json::Value::Null,
        }),
    }
}

async fn metrics_endpoint(state: web::Data<ControlState>) -> HttpResponse {
    let raft = raft_status(&state).await;
    let text = metrics::render_server_metrics(
        raft.as_ref(),
        &state.registry.list(),
        &state.restarts.snapshot(),
    );
    HttpResponse::Ok()
        .content_type(crate::metrics::CONTENT_TYPE)
        .body(text)
}

async fn resize_volume(
    state: web::Data<ControlState>,
    name: web::Path<String>,
    body: web::Json<ResizeVolumeRequest>,
) -> HttpResponse {
    use actix_web::http::StatusCode;
    if let Err(problem) = validate_volume_name(&name) {
        return error_response(StatusCode::BAD_REQUEST, problem);
    }
    // The committed command decides (see `create_volume`), shrinking and geometry included.
    let command = encode_command(&Command::ResizeVolume {
        name: &name,
        size_bytes: body.size_bytes,
    });
    match propose(&state, command).await {
        Ok(ApplyOutcome::VolumeResized(info)) => HttpResponse::Ok().json(info),
        Ok(ApplyOutcome::Rejected(ApplyRejection::WouldShrink)) => error_response(
            StatusCode::CONFLICT,
            format!(
                "volume '{name}' is larger than {} bytes; shrinking is refused",
                body.size_bytes
            ),
        ),
        Ok(ApplyOutcome::Rejected(ApplyRejection::NoSuchVolume)) => {
            error_response(StatusCode::NOT_FOUND, format!("no volume named '{name}'"))
        }
        Ok(ApplyOutcome::Rejected(ApplyRejection::InvalidCommand)) => error_response(
            StatusCode::BAD_REQUEST,
            format!(
                "{} bytes is not a valid size for volume '{name}' (a multiple of its block size)",
                body.size_bytes
            ),
        ),
        Ok(other) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("unexpected outcome {other:?}"),
        ),
        Err(response) => response,
    }
}

async fn status(state: web::Data<ControlState>) -> HttpResponse {
    match raft_status(&state).await {
        Some(raft) => HttpResponse::Ok().json(StatusBody {
            raft,
            members: state.log_store.members(),
            volumes: state.registry.list(),
            actor_restarts: state.restarts.snapshot(),
            pid: std::process::id(),
        }),
        None => error_response(
            actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
            "the Raft actor is restarting",
        ),
    }
}

async fn list_volumes(state: web::Data<ControlState>) -> HttpResponse {
    HttpResponse::Ok().json(state.registry.list())
}

async fn propose(state: &ControlState, command: Vec<u8>) -> Result<ApplyOutcome, HttpResponse> {
    let deadline = Instant::now() + state.request_timeout;
    propose_until(&state.raft, Bytes::from(command), deadline)
        .await
        .map_err(|error| {
            error_response(
                actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
                format!("the cluster did not commit the change: {error}"),
            )
        })
}

async fn create_volume(
    state: web::Data<ControlState>,
    body: web::Json<CreateVolumeRequest>,
) -> HttpResponse {
    use actix_web::http::StatusCode;
    if let Err(problem) = validate_volume_name(&body.name)
        .and_then(|()| validate_volume_geometry(body.size_bytes, body.block_size_bytes))
    {
        return error_response(StatusCode::BAD_REQUEST, problem);
    }
    // No look at this node's own volume table first: it may lag behind the group. The
    // committed command decides, the same on every server.
    let command = encode_command(&Command::CreateVolume {
        name: &body.name,
        size_bytes: body.size_bytes,
        block_size_bytes: body.block_size_bytes,
    });
    match propose(&state, command).await {
        Ok(ApplyOutcome::VolumeCreated(info)) => HttpResponse::Created().json(info),
        Ok(ApplyOutcome::Rejected(ApplyRejection::VolumeExists)) => error_response(
            StatusCode::CONFLICT,
            format!("volume '{}' already exists", body.name),
        ),
        Ok(other) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("unexpected outcome {other:?}"),
        ),
        Err(response) => response,
    }
}

async fn delete_volume(state: web::Data<ControlState>, name: web::Path<String>) -> HttpResponse {
    use actix_web::http::StatusCode;
    // A command carries at most 255 bytes of a name: a longer one would name another volume.
    if let Err(problem) = validate_volume_name(&name) {
        return error_response(StatusCode::BAD_REQUEST, problem);
    }
    // The committed command decides (see `create_volume`).
    let command = encode_command(&Command::DeleteVolume { name: &name });
    match propose(&state, command).await {
        Ok(ApplyOutcome::VolumeDeleted(_)) => HttpResponse::NoContent().finish(),
        Ok(ApplyOutcome::Rejected(ApplyRejection::NoSuchVolume)) => {
            error_response(StatusCode::NOT_FOUND, format!("no volume named '{name}'"))
        }
        Ok(other) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("unexpected outcome {other:?}"),
        ),
        Err(response) => response,
    }
}

/// Client names are recorded in the volume table and shown to operators: printable, bounded.
fn validate_client_name(client: &str) -> Result<(), String> {
    if client.is_empty()
        || client.len() > 255
        || !client
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '\\')
    {
        return Err("a client id must be 1 to 255 printable ASCII characters".into());
    }
    Ok(())
}

async fn attach_volume(
    state: web::Data<ControlState>,
    name: web::Path<String>,
    body: web::Json<AttachRequest>,
) -> HttpResponse {
    use actix_web::http::StatusCode;
    if let Err(problem) =
        validate_volume_name(&name).and_then(|()| validate_client_name(&body.client))
    {
        return error_response(StatusCode::BAD_REQUEST, problem);
    }
    // The committed command decides (see `create_volume`): a lagging server's "no such
    // volume" would make a proxy declare the volume lost.
    let command = encode_command(&Command::Attach {
        name: &name,
        client: &body.client,
        force: body.force,
        attach_id: body.attach_id,
    });
    match propose(&state, command).await {
        Ok(ApplyOutcome::Attached(volume)) => match volume.attachment.clone() {
            Some(attachment) => HttpResponse::Ok().json(AttachReply {
                epoch: attachment.epoch,
                volume,
            }),
            None => error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "attached volume without an attachment",
            ),
        },
        Ok(ApplyOutcome::Rejected(ApplyRejection::AttachedByOther)) => {
            let holder = state
                .registry
                .get(&name)
                .and_then(|reader| reader.info().attachment.clone());
            let holder = holder
                .map(|attachment| {
                    format!(
                        "client '{}' (epoch {})",
                        attachment.client, attachment.epoch
                    )
                })
                .unwrap_or_else(|| "another client".to_string());
            error_response(
                StatusCode::CONFLICT,
                format!(
                    "volume '{name}' is attached read-write by {holder}; detach it there \
                     first, or attach with force to take it over (the old writer is fenced)"
                ),
            )
        }
        Ok(ApplyOutcome::Rejected(ApplyRejection::NoSuchVolume)) => {
            error_response(StatusCode::NOT_FOUND, format!("no volume named '{name}'"))
        }
        Ok(other) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("unexpected outcome {other:?}"),
        ),
        Err(response) => response,
    }
}

async fn detach_volume(
    state: web::Data<ControlState>,
    name: web::Path<String>,
    query: web::Query<DetachQuery>,
) -> HttpResponse {
    use actix_web::http::StatusCode;
    if let Err(problem) = validate_volume_name(&name) {
        return error_response(StatusCode::BAD_REQUEST, problem);
    }
    let command = encode_command(&Command::Detach {
        name: &name,
        epoch: query.epoch,
    });
    match propose(&state, command).await {
        Ok(ApplyOutcome::Detached(volume)) => HttpResponse::Ok().json(volume),
        Ok(ApplyOutcome::Rejected(ApplyRejection::Fenced)) => error_response(
            StatusCode::CONFLICT,
            format!(
                "epoch {} is not the current attachment of volume '{name}'",
                query.epoch
            ),
        ),
        Ok(ApplyOutcome::Rejected(ApplyRejection::NoSuchVolume)) => {
            error_response(StatusCode::NOT_FOUND, format!("no volume named '{name}'"))
        }
        Ok(other) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("unexpected outcome {other:?}"),
        ),
        Err(response) => response,
    }
}

async fn volume_digest(state: web::Data<ControlState>, name: web::Path<String>) -> HttpResponse {
    use actix_web::http::StatusCode;
    match state
        .storage
        .send(ComputeVolumeDigest {
            name: name.into_inner(),
        })
        .await
    {
        Ok(Ok(digest)) => HttpResponse::Ok().json(digest),
        Ok(Err(error @ StorageRequestError::NoSuchVolume(_))) => {
            error_response(StatusCode::NOT_FOUND, error.to_string())
        }
        Ok(Err(error @ StorageRequestError::Crashed(_))) => {
            error_response(StatusCode::SERVICE_UNAVAILABLE, error.to_string())
        }
        // A corrupt replica (checksum mismatch) or a failing disk on this node.
        Ok(Err(error @ StorageRequestError::Storage(_))) => {
            error_response(StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
        }
        Err(error) => error_response(StatusCode::SERVICE_UNAVAILABLE, error.to_string()),
    }
}

/// What the proxy's control API serves.
pub struct ProxyControlState {
    pub restarts: std::sync::Arc<crate::actors::supervisor::RestartCounters>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProxyStatusBody {
    pub actor_restarts: RestartCounts,
    pub pid: u32,
}

async fn proxy_status(state: web::Data<ProxyControlState>) -> HttpResponse {
    HttpResponse::Ok().json(ProxyStatusBody {
        actor_restarts: state.restarts.snapshot(),
        pid: std::process::id(),
    })
}

/// The proxy's routes: its status and, in builds with the feature, failpoints.
pub fn configure_proxy(config: &mut web::ServiceConfig) {
    config.route("/v1/status", web::get().to(proxy_status));
    configure_failpoints(config);
}

/// `PUT /v1/failpoints/{name}` with a `fail` action as body (`panic`, `1*panic`, `delay(100)`,
/// `off`, ...): arms a named failpoint in this running process. Only builds with the
/// `failpoints` feature have the route; elsewhere it is a 404.
#[cfg(feature = "failpoints")]
fn configure_failpoints(config: &mut web::ServiceConfig) {
    config.route("/v1/failpoints/{name}", web::put().to(put_failpoint));
}

#[cfg(not(feature = "failpoints"))]
fn configure_failpoints(_config: &mut web::ServiceConfig) {}

#[cfg(feature = "failpoints")]
async fn put_failpoint(name: web::Path<String>, body: String) -> HttpResponse {
    let name = name.into_inner();
    let action = body.trim();
    if name.is_empty() || name.len() > 128 || action.len() > 256 {
        return error_response(
            actix_web::http::StatusCode::BAD_REQUEST,
            "failpoint name or action too long",
        );
    }
    match fail::cfg(name.as_str(), action) {
        Ok(()) => HttpResponse::NoContent().finish(),
        Err(error) => error_response(actix_web::http::StatusCode::BAD_REQUEST, error),
    }
}

/// Registers the routes; used by the server and by tests.
pub fn configure(config: &mut web::ServiceConfig) {
    configure_failpoints(config);
    config
        .route("/health", web::get().to(health))
        .route("/metrics", web::get().to(metrics_endpoint))
        .route("/v1/volumes/{name}/resize", web::post().to(resize_volume))
        .route("/v1/status", web::get().to(status))
        .route("/v1/volumes", web::get().to(list_volumes))
        .route("/v1/volumes", web::post().to(create_volume))
        .route("/v1/volumes/{name}", web::delete().to(delete_volume))
        .route("/v1/volumes/{name}/attach", web::post().to(attach_volume))
        .route("/v1/volumes/{name}/attach", web::delete().to(detach_volume))
        .route("/v1/volumes/{name}/digest", web::get().to(volume_digest))
        .configure(members::configure);
}

/// Errors of the control API client, phrased for the person at the terminal.
#[derive(Debug, thiserror::Error)]
pub enum ControlClientError {
    #[error("cannot reach the raftblk control API at {address}: {detail} (is `raftblk server` running?)")]
    Unreachable { address: String, detail: String },
    #[error("{0}")]
    Refused(String),
    #[error("unexpected reply from {address}: {detail}")]
    BadReply { address: String, detail: String },
}

/// A blocking client for the `raftblk volume` and `raftblk ctl` commands.
pub struct ControlClient {
    address: String,
    agent: ureq::Agent,
    /// Sent as `Authorization: Bearer` on mutating requests; empty: none.
    token: String,
}

impl ControlClient {
    pub fn new(address: &str) -> Self {
        Self::with_timeout(address, Duration::from_secs(60))
    }

    pub fn with_timeout(address: &str, timeout: Duration) -> Self {
        let agent = ureq::AgentBuilder::new().timeout(timeout).build();
        ControlClient {
            address: address.to_string(),
            agent,
            token: String::new(),
        }
    }

    /// The token for mutating requests (`control.token` of the cluster).
    pub fn token(mut self, token: &str) -> Self {
        self.token = token.to_string();
        self
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// A mutating request, with the token if there is one.
    fn mutation(&self, method: &str, path: &str) -> ureq::Request {
        let request = self.agent.request(method, &self.url(path));
        if self.token.is_empty() {
            request
        } else {
            request.set("Authorization", &format!("Bearer {}", self.token))
        }
    }

    pub fn resize_volume(
        &self,
        name: &str,
        size_bytes: u64,
    ) -> Result<VolumeInfo, ControlClientError> {
        let response = self
            .mutation("POST", &format!("/v1/volumes/{name}/resize"))
            .send_json(ResizeVolumeRequest { size_bytes })
            .map_err(|error| self.map_error(error))?;
        response.into_json().map_err(|error| self.bad_reply(error))
    }

    /// `GET /health`: the body whether the node is healthy (200) or not (503).
    pub fn health(&self) -> Result<HealthBody, ControlClientError> {
        let response = match self.agent.get(&self.url("/health")).call() {
            Ok(response) => response,
            Err(ureq::Error::Status(503, response)) => response,
            Err(error) => return Err(self.map_error(error)),
        };
        response.into_json().map_err(|error| self.bad_reply(error))
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    fn map_error(&self, error: ureq::Error) -> ControlClientError {
        match error {
            ureq::Error::Status(_, response) => {
                let body = response.into_string().unwrap_or_default();
                match serde_json::from_str::<ErrorBody>(&body) {
                    Ok(parsed) => ControlClientError::Refused(parsed.error),
                    Err(_) => ControlClientError::Refused(body),
                }
            }
            ureq::Error::Transport(transport) => ControlClientError::Unreachable {
                address: self.address.clone(),
                detail: transport.to_string(),
            },
        }
    }

    fn bad_reply(&self, detail: impl ToString) -> ControlClientError {
        ControlClientError::BadReply {
            address: self.address.clone(),
            detail: detail.to_string(),
        }
    }

    pub fn list_volumes(&self) -> Result<Vec<VolumeInfo>, ControlClientError> {
        let response = self
            .agent
            .get(&self.url("/v1/volumes"))
            .call()
            .map_err(|error| self.map_error(error))?;
        response.into_json().map_err(|error| self.bad_reply(error))
    }

    pub fn create_volume(
        &self,
        request: &CreateVolumeRequest,
    ) -> Result<VolumeInfo, ControlClientError> {
        let response = self
            .mutation("POST", "/v1/volumes")
            .send_json(request)
            .map_err(|error| self.map_error(error))?;
        response.into_json().map_err(|error| self.bad_reply(error))
    }

    pub fn delete_volume(&self, name: &str) -> Result<(), ControlClientError> {
        self.mutation("DELETE", &format!("/v1/volumes/{name}"))
            .call()
            .map_err(|error| self.map_error(error))?;
        Ok(())
    }

    pub fn attach(
        &self,
        name: &str,
        request: &AttachRequest,
    ) -> Result<AttachReply, ControlClientError> {
        let response = self
            .mutation("POST", &format!("/v1/volumes/{name}/attach"))
            .send_json(request)
            .map_err(|error| self.map_error(error))?;
        response.into_json().map_err(|error| self.bad_reply(error))
    }

    pub fn detach(&self, name: &str, epoch: u64) -> Result<(), ControlClientError> {
        self.mutation(
            "DELETE",
            &format!("/v1/volumes/{name}/attach?epoch={epoch}"),
        )
        .call()
        .map_err(|error| self.map_error(error))?;
        Ok(())
    }

    pub fn volume_digest(&self, name: &str) -> Result<VolumeDigest, ControlClientError> {
        let response = self
            .agent
            .get(&self.url(&format!("/v1/volumes/{name}/digest")))
            .call()
            .map_err(|error| self.map_error(error))?;
        response.into_json().map_err(|error| self.bad_reply(error))
    }

    pub fn status(&self) -> Result<serde_json::Value, ControlClientError> {
        let response = self
            .agent
            .get(&self.url("/v1/status"))
            .call()
            .map_err(|error| self.map_error(error))?;
        response.into_json().map_err(|error| self.bad_reply(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names_are_bounded_and_printable() {
        assert!(validate_volume_name("disk0").is_ok());
        assert!(validate_volume_name("vm-1.root_disk").is_ok());
        assert!(validate_volume_name("").is_err());
        assert!(validate_volume_name("a/b").is_err());
        assert!(validate_volume_name(&"x".repeat(256)).is_err());
    }
}
