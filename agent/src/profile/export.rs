//! Sends CPU profiles over OTLP (the profiles signal, v1development) to the traces'
//! collector: gRPC `ProfilesService/Export`, or HTTP POST to `/v1development/profiles`.
//! A failed export is counted and dropped (the next window has its own samples).
use std::sync::{Arc, atomic::Ordering};

use opentelemetry_proto::tonic::{
    collector::profiles::v1development::{ExportProfilesServiceRequest, profiles_service_client::ProfilesServiceClient},
    common::v1::{AnyValue, KeyValue, any_value},
};
use prost::Message as _;

use super::model::Profile;
use crate::{cli::Protocol, export::otlp::Resources, settings::ExportSettings};

pub struct ProfilesSink {
    settings: ExportSettings,
    grpc: Option<ProfilesServiceClient<tonic::transport::Channel>>,
    http: Option<reqwest::Client>,
    url: String,
}

impl ProfilesSink {
    pub fn new(settings: &ExportSettings) -> Self {
        let url = match settings.protocol {
            Protocol::Grpc => settings.endpoint.clone(),
            Protocol::HttpProtobuf => match settings.endpoint.strip_suffix("/v1/traces") {
                Some(base) => format!("{base}/v1development/profiles"),
                None => format!("{}/v1development/profiles", settings.endpoint.trim_end_matches('/')),
            },
        };
        Self { settings: settings.clone(), grpc: None, http: None, url }
    }

    /// Sends one request; Err: why.
    pub async fn send(&mut self, req: ExportProfilesServiceRequest) -> Result<(), String> {
        let timeout = self.settings.timeout;
        match self.settings.protocol {
            Protocol::Grpc => {
                if self.grpc.is_none() {
                    let ch = tonic::transport::Endpoint::from_shared(self.url.clone())
                        .map_err(|e| e.to_string())?
                        .timeout(timeout)
                        .connect_lazy();
                    self.grpc = Some(ProfilesServiceClient::new(ch));
                }
                let mut r = tonic::Request::new(req);
                for (k, v) in &self.settings.headers {
                    if let (Ok(k), Ok(v)) = (k.parse::<tonic::metadata::MetadataKey<_>>(), v.parse()) {
                        r.metadata_mut().insert(k, v);
                    }
                }
                let Some(client) = self.grpc.as_mut() else { return Err("no client".into()) };
                client.export(r).await.map(drop).map_err(|e| e.message().to_owned())
            }
            Protocol::HttpProtobuf => {
                let client = self.http.get_or_insert_with(reqwest::Client::new);
                let mut b = client
                    .post(&self.url)
                    .timeout(timeout)
                    .header("content-type", "application/x-protobuf")
                    .body(req.encode_to_vec());
                for (k, v) in &self.settings.headers {
                    b = b.header(k.as_str(), v.as_str());
                }
                let resp = b.send().await.map_err(|e| e.to_string())?;
                if resp.status().is_success() { Ok(()) } else { Err(format!("HTTP {}", resp.status())) }
            }
        }
    }
}

/// The resource attributes of process `pid` as the traces carry them.
pub fn resource_of(resources: &Resources, pid: u32) -> Vec<KeyValue> {
    let res = resources.lock().unwrap_or_else(|e| e.into_inner());
    res.get(&pid)
        .map(|r| {
            r.iter()
                .map(|(k, v)| {
                    let value = match v {
                        opentelemetry::Value::I64(i) => any_value::Value::IntValue(*i),
                        other => any_value::Value::StringValue(other.to_string()),
                    };
                    KeyValue { key: k.as_str().to_owned(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The task that sends each window's profile; returns when the profiler is gone.
pub async fn export_task(
    settings: ExportSettings,
    resources: Resources,
    mut rx: tokio::sync::mpsc::Receiver<Profile>,
    stats: Arc<crate::export::ExportStats>,
) {
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
