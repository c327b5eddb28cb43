//! A real OTLP/HTTP receiver for the tests: `POST /v1/traces` bodies are
//! decoded with the OpenTelemetry project's own protobuf definitions
//! (`opentelemetry-proto`) and kept. It runs on a thread of its own, so a
//! test may block on a flush while it answers.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use actix_web::{App, HttpResponse, HttpServer, web};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

/// The spans received so far.
#[derive(Clone, Default)]
pub struct Received(Arc<Mutex<Vec<Span>>>);

impl Received {
    pub fn spans(&self) -> Vec<Span> {
        self.0.lock().unwrap().clone()
    }
}

pub struct Receiver {
    pub endpoint: String,
    pub received: Received,
    server: actix_web::dev::ServerHandle,
    thread: Option<JoinHandle<()>>,
}

impl Receiver {
    pub fn start() -> Self {
        let received = Received::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let kept = received.clone();
        let thread = std::thread::spawn(move || {
            actix_rt::System::new().block_on(async move {
                let server = HttpServer::new(move || {
                    App::new()
                        .app_data(web::Data::new(kept.clone()))
                        .app_data(web::PayloadConfig::new(16 << 20))
                        .route("/v1/traces", web::post().to(export))
                })
                .workers(1)
                .bind("127.0.0.1:0")
                .expect("bind the receiver");
                let port = server.addrs()[0].port();
                let server = server.run();
                tx.send((port, server.handle())).unwrap();
                server.await.unwrap();
            });
        });
        let (port, server) = rx.recv().unwrap();
        Receiver {
            endpoint: format!("http://127.0.0.1:{port}/v1/traces"),
            received,
            server,
            thread: Some(thread),
        }
    }

    /// Stops answering: the collector is gone.
    pub async fn stop(mut self) {
        self.server.stop(false).await;
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

async fn export(received: web::Data<Received>, body: web::Bytes) -> HttpResponse {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return HttpResponse::BadRequest().finish();
    };
    let spans = request
        .resource_spans
        .into_iter()
        .flat_map(|r| r.scope_spans)
        .flat_map(|s| s.spans);
    received.0.lock().unwrap().extend(spans);
    HttpResponse::Ok()
        .content_type("application/x-protobuf")
        .body(ExportTraceServiceResponse::default().encode_to_vec())
}
