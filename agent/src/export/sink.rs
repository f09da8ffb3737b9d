//! One OTLP request at a time to the traces' collector, for the signals sent now and then
//! (metrics every interval, profiles every window): gRPC (a unary call on `grpc_path`, the
//! channel connected lazily) or http/protobuf (POST to the traces endpoint with its
//! `/v1/traces` replaced by `http_path`). Spans have their own pipelined transport
//! (`otlp.rs`).
use super::{ExportSettings, Protocol};

pub struct Sink {
    settings: ExportSettings,
    grpc: Option<tonic::client::Grpc<tonic::transport::Channel>>,
    grpc_path: &'static str,
    http: Option<reqwest::Client>,
    url: String,
}

impl Sink {
    pub fn new(settings: &ExportSettings, grpc_path: &'static str, http_path: &str) -> Self {
        let url = match settings.protocol {
            Protocol::Grpc => settings.endpoint.clone(),
            Protocol::HttpProtobuf => match settings.endpoint.strip_suffix("/v1/traces") {
                Some(base) => format!("{base}{http_path}"),
                None => format!("{}{http_path}", settings.endpoint.trim_end_matches('/')),
            },
        };
        Self { settings: settings.clone(), grpc: None, grpc_path, http: None, url }
    }

    /// Sends one request; Err: why (the caller counts it).
    pub async fn send<Req, Resp>(&mut self, req: Req) -> Result<(), String>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let timeout = self.settings.timeout;
        match self.settings.protocol {
            Protocol::Grpc => {
                if self.grpc.is_none() {
                    let ch = super::tls::grpc_endpoint(&self.url, &self.settings.tls)?.timeout(timeout).connect_lazy();
                    self.grpc = Some(tonic::client::Grpc::new(ch));
                }
                let Some(grpc) = self.grpc.as_mut() else { return Err("no gRPC channel".into()) };
                let mut r = tonic::Request::new(req);
                for (k, v) in &self.settings.headers {
                    if let (Ok(k), Ok(v)) = (k.parse::<tonic::metadata::MetadataKey<_>>(), v.parse()) {
                        r.metadata_mut().insert(k, v);
                    }
                }
                grpc.ready().await.map_err(|e| e.to_string())?;
                let path = tonic::codegen::http::uri::PathAndQuery::from_static(self.grpc_path);
                let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
                grpc.unary(r, path, codec).await.map(drop).map_err(|e| e.message().to_owned())
            }
            Protocol::HttpProtobuf => {
                if self.http.is_none() {
                    self.http = Some(super::tls::http_builder(&self.settings.tls)?.build().map_err(|e| e.to_string())?);
                }
                let Some(client) = self.http.as_ref() else { return Err("no HTTP client".into()) };
                let mut b = client.post(&self.url).timeout(timeout).header("content-type", "application/x-protobuf").body(req.encode_to_vec());
                for (k, v) in &self.settings.headers {
                    b = b.header(k.as_str(), v.as_str());
                }
                let resp = b.send().await.map_err(|e| e.to_string())?;
                if resp.status().is_success() { Ok(()) } else { Err(format!("HTTP {}", resp.status())) }
            }
        }
    }
}
