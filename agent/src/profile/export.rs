//! Sends CPU profiles over OTLP (the profiles signal, v1development) to the traces'
//! collector: gRPC `ProfilesService/Export`, or HTTP POST to `/v1development/profiles`.
//! A failed export is counted and dropped (the next window has its own samples).
use std::sync::{Arc, atomic::Ordering};

use opentelemetry_proto::tonic::{
    collector::profiles::v1development::{ExportProfilesServiceRequest, ExportProfilesServiceResponse},
    common::v1::KeyValue,
};

use super::model::Profile;
use crate::{export::otlp::Resources, settings::ExportSettings};

/// Where profiles go: the traces' collector, `/v1development/profiles` for http/protobuf.
pub struct ProfilesSink(crate::export::sink::Sink);

impl ProfilesSink {
    pub fn new(settings: &ExportSettings) -> Self {
        Self(crate::export::sink::Sink::new(
            settings,
            "/opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export",
            "/v1development/profiles",
        ))
    }

    /// Sends one request; Err: why.
    pub async fn send(&mut self, req: ExportProfilesServiceRequest) -> Result<(), String> {
        self.0.send::<_, ExportProfilesServiceResponse>(req).await
    }
}

/// The resource attributes of process `pid` as the traces carry them.
pub fn resource_of(resources: &Resources, pid: u32) -> Vec<KeyValue> {
    let res = resources.lock().unwrap_or_else(|e| e.into_inner());
    res.get(&pid).map(crate::export::metrics::proto_attributes).unwrap_or_default()
}

/// The task that sends each window's profile; returns when the profiler is gone.
pub async fn export_task(settings: ExportSettings, resources: Resources, mut rx: tokio::sync::mpsc::Receiver<Profile>, stats: Arc<crate::export::ExportStats>) {
    let mut sink = ProfilesSink::new(&settings);
    while let Some(p) = rx.recv().await {
        let req = super::otlp::to_request(&p, &|pid| resource_of(&resources, pid));
        match sink.send(req).await {
            Ok(()) => {
                stats.profiles.exported.fetch_add(1, Ordering::Relaxed);
            }
            Err(why) => {
                if stats.profiles.export_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(error = %why, "OTLP profiles export failed (counted; later windows are still sent)");
                }
            }
        }
    }
}
