//! The one upstream HTTP client: hyper-util's pooled client over rustls (ring provider), or an
//! in-process handler for tests and benchmarks, behind one `send` that applies the per-call timeout.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::pacer::Pacer;
use super::ProviderError;

/// Upper bound on an upstream response body; provider answers are a few hundred bytes.
const MAX_BODY: usize = 1 << 20;

/// Default per-call timeout for every upstream request.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A handler that answers requests in process: the fake cloud's router, called without a socket.
pub type InProcessHandler = Arc<
    dyn Fn(Request<Bytes>) -> Pin<Box<dyn Future<Output = Response<Bytes>> + Send>> + Send + Sync,
>;

/// A buffered upstream response.
#[derive(Debug)]
pub struct HttpResponse {
    /// The HTTP status.
    pub status: StatusCode,
    /// The response headers (`Retry-After`, `Date`).
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

#[derive(Clone)]
enum Transport {
    Network(Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>),
    InProcess(InProcessHandler),
}

/// The upstream client shared by a provider's calls.
#[derive(Clone)]
pub struct HttpClient {
    transport: Transport,
    timeout: Duration,
    /// The endpoint's pacer, shared with every other profile on the same endpoint and
    /// credential; none in unit tests.
    pacer: Option<Arc<Pacer>>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Why the TLS client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The extra CA file could not be read or holds no certificate.
    #[error("ca_file {path}: {reason}")]
    CaFile {
        /// The file named by `ca_file`.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("tls setup: {0}")]
    Rustls(#[from] rustls::Error),
}

impl HttpClient {
    /// An HTTPS client trusting the host's roots plus `ca_file`; plain http is allowed by the
    /// connector, and config validation limits it to loopback endpoints.
    pub fn new(ca_file: Option<&Path>, timeout: Duration) -> Result<Self, TlsSetupError> {
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            // A malformed system certificate should not stop the daemon; others still work.
            let _ = roots.add(cert);
        }
        if let Some(path) = ca_file {
            let ca_err = |reason: String| TlsSetupError::CaFile {
                path: path.display().to_string(),
                reason,
            };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| ca_err(e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ca_err(e.to_string()))?;
            if certs.is_empty() {
                return Err(ca_err("no PEM certificate found".into()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| ca_err(e.to_string()))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(HttpClient {
            transport: Transport::Network(client),
            timeout,
            pacer: None,
        })
    }

    /// A client whose requests are answered by `handler` in this process.
    pub fn in_process(handler: InProcessHandler, timeout: Duration) -> Self {
        HttpClient {
            transport: Transport::InProcess(handler),
            timeout,
            pacer: None,
        }
    }

    /// The same client, its calls paced by `pacer`.
    pub fn with_pacer(&self, pacer: Arc<Pacer>) -> Self {
        HttpClient {
            pacer: Some(pacer),
            ..self.clone()
        }
    }

    /// Sends `req` and buffers the answer, within the per-call timeout, once the pacer gives
    /// it a place (the wait is not part of the timeout). Transport failures and timeouts are
    /// [`ProviderError::Transient`] when nothing was sent and [`ProviderError::Lost`]
    /// otherwise; the status is left to the caller to map.
    pub async fn send(&self, req: Request<Bytes>) -> Result<HttpResponse, ProviderError> {
        let what = format!("{} {}", req.method(), req.uri().path());
        let permit = match &self.pacer {
            Some(pacer) => Some(pacer.acquire().await),
            None => None,
        };
        let result = match tokio::time::timeout(self.timeout, self.send_inner(req)).await {
            Ok(result) => result,
            Err(_) => Err(ProviderError::Lost(format!(
                "{what}: no answer within {}",
                humantime::format_duration(self.timeout)
            ))),
        };
        if let (Some(pacer), Some(permit), Ok(resp)) = (&self.pacer, &permit, &result) {
            if resp.status == StatusCode::TOO_MANY_REQUESTS {
                pacer.throttled(permit);
            } else {
                pacer.answered();
            }
        }
        result
    }

    async fn send_inner(&self, req: Request<Bytes>) -> Result<HttpResponse, ProviderError> {
        match &self.transport {
            Transport::InProcess(handler) => {
                let resp = handler(req).await;
                let (parts, body) = resp.into_parts();
                Ok(HttpResponse {
                    status: parts.status,
                    headers: parts.headers,
                    body,
                })
            }
            Transport::Network(client) => {
                let what = format!("{} {}", req.method(), req.uri().path());
                let resp = client.request(req.map(Full::new)).await.map_err(|e| {
                    let mut chain = error_chain(&e);
                    if chain.contains("certificate") {
                        chain.push_str(" (if the API uses a private CA, set ca_file)");
                    }
                    // Failing to connect means nothing was sent; any later failure may
                    // come after the provider acted on the request.
                    if e.is_connect() {
                        ProviderError::Transient(format!("{what}: {chain}"))
                    } else {
                        ProviderError::Lost(format!("{what}: {chain}"))
                    }
                })?;
                let (parts, body) = resp.into_parts();
                let body = http_body_util::Limited::new(body, MAX_BODY)
                    .collect()
                    .await
                    .map_err(|e| ProviderError::Lost(format!("{what}: reading the answer: {e}")))?
                    .to_bytes();
                Ok(HttpResponse {
                    status: parts.status,
                    headers: parts.headers,
                    body,
                })
            }
        }
    }
}

/// An error and its sources on one line ("connection refused" is usually two levels down).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        source = s.source();
    }
    out
}

/// `Retry-After` as seconds (the HTTP-date form is rare from APIs and is treated as absent).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Canned upstream answers for the providers' unit tests.
#[cfg(test)]
pub(crate) mod canned {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http::{Response, StatusCode};

    use super::{HttpClient, InProcessHandler, DEFAULT_CALL_TIMEOUT};

    /// What the client was asked, as `"METHOD /path"`, in order.
    pub(crate) type Asked = Arc<Mutex<Vec<String>>>;

    /// A client that answers its requests, in order, with `answers` (status and JSON body), and
    /// records each request. A request beyond the last answer gets a 599 that names it.
    pub(crate) fn client(answers: Vec<(u16, serde_json::Value)>) -> (HttpClient, Asked) {
        let answers = Arc::new(Mutex::new(VecDeque::from(answers)));
        let asked: Asked = Arc::default();
        let log = asked.clone();
        let handler: InProcessHandler = Arc::new(move |req| {
            let what = format!("{} {}", req.method(), req.uri().path());
            log.lock().unwrap().push(what.clone());
            let next = answers.lock().unwrap().pop_front();
            let (status, body) = next.unwrap_or((599, serde_json::json!({ "unexpected": what })));
            Box::pin(async move {
                Response::builder()
                    .status(StatusCode::from_u16(status).unwrap())
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Bytes::from(body.to_string()))
                    .unwrap()
            })
        });
        (HttpClient::in_process(handler, DEFAULT_CALL_TIMEOUT), asked)
    }
}
