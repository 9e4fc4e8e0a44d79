//! A scripted stand-in for the command-dispatcher: a real gRPC server on port 0 that
//! checks the credential, reads `Hello`, answers `Welcome`, and hands each connection to
//! the test, which then plays the dispatcher's side message by message.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

use streamspace_proto::agent::v1 as pb;
use streamspace_proto::agent::v1::agent_message::Msg;
use streamspace_proto::agent::v1::agent_service_server::{AgentService, AgentServiceServer};
use streamspace_proto::agent::v1::dispatcher_message::Msg as Out;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use crate::helpers::DEADLINE;

pub const AGENT_ID: &str = "agent-under-test";

/// One accepted connection, from the dispatcher's side.
pub struct Conn {
    pub hello: pb::Hello,
    pub epoch: i64,
    inbound: Streaming<pb::AgentMessage>,
    outbound: Option<mpsc::Sender<Result<pb::DispatcherMessage, Status>>>,
}

impl Conn {
    pub async fn send(&self, msg: Out) {
        let outbound = self.outbound.as_ref().expect("connection already cut");
        outbound
            .send(Ok(pb::DispatcherMessage { msg: Some(msg) }))
            .await
            .expect("agent went away");
    }

    /// The next message from the agent, heartbeats included.
    pub async fn recv_any(&mut self) -> Msg {
        tokio::time::timeout(DEADLINE, self.inbound.message())
            .await
            .expect("no message from the agent within the deadline")
            .expect("stream failed")
            .expect("stream ended")
            .msg
            .expect("empty message")
    }

    /// The next message that is not a heartbeat.
    pub async fn recv(&mut self) -> Msg {
        loop {
            match self.recv_any().await {
                Msg::Heartbeat(_) => continue,
                other => return other,
            }
        }
    }

    /// Ends the dispatcher's side of the stream, as a dispatcher restart would.
    pub fn cut(&mut self) {
        self.outbound = None;
    }

    /// Waits for the agent to end its side; true when it ended cleanly (no error). Then
    /// ends the dispatcher's side too, as the real dispatcher does.
    pub async fn closed_cleanly(&mut self) -> bool {
        loop {
            match tokio::time::timeout(DEADLINE, self.inbound.message()).await {
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) => {
                    self.cut();
                    return true;
                }
                Ok(Err(_)) | Err(_) => return false,
            }
        }
    }
}

struct Service {
    credential: String,
    heartbeat_interval_ms: u32,
    epoch: AtomicI64,
    rejected: Arc<AtomicUsize>,
    conns: mpsc::UnboundedSender<Conn>,
}

#[tonic::async_trait]
impl AgentService for Service {
    type ConnectStream = ReceiverStream<Result<pb::DispatcherMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if auth.as_deref() != Some(&format!("Bearer {}", self.credential)) {
            self.rejected.fetch_add(1, Ordering::SeqCst);
            return Err(Status::unauthenticated("unknown agent credential"));
        }
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(pb::AgentMessage {
                msg: Some(Msg::Hello(hello)),
            }) => hello,
            other => {
                return Err(Status::invalid_argument(format!(
                    "expected Hello, got {other:?}"
                )));
            }
        };
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        let (tx, rx) = mpsc::channel(64);
        let welcome = pb::Welcome {
            agent_id: AGENT_ID.into(),
            connection_epoch: epoch,
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            max_in_flight: 16,
            max_message_bytes: 4 << 20,
            protocol_version: pb::PROTOCOL_VERSION,
        };
        let _ = tx
            .send(Ok(pb::DispatcherMessage {
                msg: Some(Out::Welcome(welcome)),
            }))
            .await;
        let _ = self.conns.send(Conn {
            hello,
            epoch,
            inbound,
            outbound: Some(tx),
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

pub struct FakeDispatcher {
    pub url: String,
    conns: mpsc::UnboundedReceiver<Conn>,
    /// Connection attempts refused for a wrong credential.
    pub rejected: Arc<AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl FakeDispatcher {
    pub async fn start(credential: &str, heartbeat_interval_ms: u32) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (conns_tx, conns) = mpsc::unbounded_channel();
        let rejected = Arc::new(AtomicUsize::new(0));
        let service = Service {
            credential: credential.into(),
            heartbeat_interval_ms,
            epoch: AtomicI64::new(0),
            rejected: rejected.clone(),
            conns: conns_tx,
        };
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(AgentServiceServer::new(service))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        Self {
            url,
            conns,
            rejected,
            server,
        }
    }

    /// The next connection the agent makes.
    pub async fn accept(&mut self) -> Conn {
        tokio::time::timeout(DEADLINE, self.conns.recv())
            .await
            .expect("the agent did not connect within the deadline")
            .unwrap()
    }
}

impl Drop for FakeDispatcher {
    fn drop(&mut self) {
        self.server.abort();
    }
}
