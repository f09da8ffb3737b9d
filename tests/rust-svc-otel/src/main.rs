//! `rust-svc-otel ADDR`: the peer `cargo xtask bench overhead --cases rust-sdk` compares
//! zerotrace with. rust-svc's `/hello` and `/slow/MS` routes, instrumented by hand the way
//! the OpenTelemetry Rust docs show: `tracing` spans from tower-http's `TraceLayer` (one per
//! request, at INFO), bridged by `tracing-opentelemetry` to the SDK, whose batch span processor
//! exports over OTLP/gRPC (tonic). The exporter is configured by the standard environment
//! variables (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_BSP_*`); SIGTERM flushes and exits.
use std::time::Duration;

use axum::{Router, extract::Path, routing::get};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use tokio::signal::unix::{SignalKind, signal};
use tower_http::trace::{DefaultMakeSpan, TraceLayer};
use tracing::{Level, level_filters::LevelFilter};
use tracing_subscriber::{filter::Targets, prelude::*};

async fn hello() -> &'static str {
    "hello"
}

async fn slow(Path(ms): Path<u64>) -> String {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    format!("slept {ms} ms")
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args().nth(1).ok_or("usage: rust-svc-otel ADDR")?;
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?;
    let provider =
        SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(Resource::builder().with_service_name("rust-svc-otel").build()).build();
    // As opentelemetry-otlp's examples do: INFO and up, and never the exporter's own
    // transport (its spans would be exported, making more spans).
    let filter = Targets::new()
        .with_default(Level::INFO)
        .with_target("h2", LevelFilter::OFF)
        .with_target("hyper", LevelFilter::OFF)
        .with_target("tonic", LevelFilter::OFF);
    tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("rust-svc-otel")).with_filter(filter)).init();
    let app = Router::new()
        .route("/hello", get(hello))
        .route("/slow/{ms}", get(slow))
        .layer(TraceLayer::new_for_http().make_span_with(DefaultMakeSpan::new().level(Level::INFO)));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let mut term = signal(SignalKind::terminate())?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            term.recv().await;
        })
        .await?;
    // The default shutdown gives up after 5 s; a bench flushing a full queue needs longer.
    provider.shutdown_with_timeout(Duration::from_secs(60))?;
    Ok(())
}
