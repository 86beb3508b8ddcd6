//! Issue 9: idem standing in for each provider. Every test starts the real `idem`
//! binary with the configuration that ships in `examples/configs/<provider>.toml`, in
//! front of a counting upstream, and checks each behaviour the provider's page
//! documents, the page's sentence quoted beside the assertion.
//!
//! The upstream here is this file's own (any method, any path), driven by request
//! headers that idem does not fingerprint: `x-test-status` (the status it answers),
//! `x-test-hold` (wait until the test opens the gate: a request held in flight).
//! It mints its own `X-Request-Id: req_N` on every answer, as TXCloud does.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use common::Idem;
use idem_test_support::Counter;
use serde_json::Value;
use tokio::sync::Semaphore;

const TENANT_SECRET: &str = "provider-tests-tenant-secret-0123456789";
const ADMIN_TOKEN: &str = "provider-tests-admin-token-0123456789";

// ---------------------------------------------------------------------------------
// The upstream

#[derive(Clone)]
struct Api {
    counter: Counter,
    seq: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
}

impl Api {
    /// Executions of `METHOD path` with this key (in either key header; "" for none).
    fn runs(&self, method: &str, path: &str, key: &str) -> usize {
        self.counter.get(&format!("{method} {path} {key}"))
    }

    /// Lets one held request finish.
    fn release_one(&self) {
        self.gate.add_permits(1);
    }

    /// Waits until the upstream has seen `METHOD path key` once (bounded).
    async fn until_running(&self, method: &str, path: &str, key: &str) {
        for _ in 0..2000 {
            if self.runs(method, path, key) > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("{method} {path} {key} never reached the upstream");
    }
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

async fn any(
    State(api): State<Api>,
    method: Method,
    uri: Uri,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    let key = header(&h, "idempotency-key")
        .or_else(|| header(&h, "x-idempotency-key"))
        .unwrap_or("");
    let execution = api.counter.hit(&format!("{method} {} {key}", uri.path()));
    if h.contains_key("x-test-hold") {
        api.gate.acquire().await.expect("gate").forget();
    }
    let status = header(&h, "x-test-status")
        .and_then(|s| s.parse().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(if method == Method::POST {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        });
    let id = api.seq.fetch_add(1, Ordering::SeqCst) + 1;
    let doc = serde_json::json!({
        "id": format!("obj_{id}"),
        "method": method.as_str(),
        "path": uri.path(),
        "execution": execution,
        "bytes": body.len(),
    });
    (
        status,
        [
            ("content-type", "application/json".to_owned()),
            ("x-request-id", format!("req_{id}")),
        ],
        doc.to_string(),
    )
        .into_response()
}

async fn api_upstream() -> (Api, SocketAddr) {
    let api = Api {
        counter: Counter::default(),
        seq: Arc::new(AtomicUsize::new(0)),
        gate: Arc::new(Semaphore::new(0)),
    };
    let app = Router::new().fallback(any).with_state(api.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (api, addr)
}

// ---------------------------------------------------------------------------------
// The sidecar, started from a shipped configuration

fn config_path(provider: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/configs")
        .join(format!("{provider}.toml"))
}

struct Sidecar {
    idem: Idem,
    _dir: tempfile::TempDir,
}

/// `idem serve --config examples/configs/<provider>.toml --upstream http://<up>`, with
/// the tenant secret and an admin token in its environment.
fn start_provider(provider: &str, up: SocketAddr) -> Sidecar {
    let dir = tempfile::tempdir().unwrap();
    let config = config_path(provider);
    let idem = common::start_idem_with_env(
        dir.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--upstream",
            &format!("http://{up}"),
            "--admin-listen",
            "127.0.0.1:0",
        ],
        &[
            ("IDEM_TENANT_SECRET", TENANT_SECRET),
            ("IDEM_ADMIN_TOKEN", ADMIN_TOKEN),
        ],
    );
    Sidecar { idem, _dir: dir }
}

impl Sidecar {
    fn url(&self, path: &str) -> String {
        self.idem.url(path)
    }

    /// The admin API's view of a record: `GET /keys`.
    async fn inspect(&self, route: &str, key: &str, credential: &str) -> Value {
        let admin = self.idem.admin.expect("admin listener");
        let res = idem_test_support::client()
            .get(format!("http://{admin}/keys"))
            .bearer_auth(ADMIN_TOKEN)
            .query(&[("route", route), ("key", key), ("credential", credential)])
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "no record for {route} {key}");
        res.json().await.unwrap()
    }

    /// How long the record is kept, in whole hours (expires_at − created_at).
    async fn retention_hours(&self, route: &str, key: &str, credential: &str) -> u64 {
        let doc = self.inspect(route, key, credential).await;
        assert_eq!(doc["state"], "completed", "{doc}");
        let at = |f: &str| humantime::parse_rfc3339(doc[f].as_str().unwrap()).unwrap();
        at("expires_at")
            .duration_since(at("created_at"))
            .unwrap()
            .as_secs()
            / 3600
    }

    /// Deletes the record, as the background purge does once it has expired: a
    /// black-box test cannot move the sidecar's clock by 24 or 72 hours.
    async fn purge(&self, route: &str, key: &str, credential: &str) {
        let admin = self.idem.admin.expect("admin listener");
        let res = idem_test_support::client()
            .delete(format!("http://{admin}/keys"))
            .bearer_auth(ADMIN_TOKEN)
            .query(&[("route", route), ("key", key), ("credential", credential)])
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
}

// ---------------------------------------------------------------------------------
// Requests

#[derive(Clone)]
struct Req {
    method: Method,
    url: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Req {
    fn new(method: Method, url: String) -> Self {
        Req {
            method,
            url,
            headers: Vec::new(),
            body: String::new(),
        }
    }

    fn post(url: String) -> Self {
        Req::new(Method::POST, url).h("content-type", "application/json")
    }

    /// Adds a header (repeating a name adds a second field).
    fn h(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    fn body(mut self, body: &str) -> Self {
        self.body = body.to_owned();
        self
    }

    async fn send(self) -> Answer {
        let mut req = idem_test_support::client().request(self.method, self.url);
        for (n, v) in self.headers {
            req = req.header(n, v);
        }
        let res = req.body(self.body).send().await.unwrap();
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let body = res.text().await.unwrap();
        Answer {
            status,
            headers,
            body,
        }
    }

    /// Sends it in the background (for a request held in flight by the upstream).
    fn spawn(self) -> tokio::task::JoinHandle<Answer> {
        tokio::spawn(self.send())
    }
}

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }

    /// `type` of an `application/problem+json` answer.
    fn problem_type(&self) -> String {
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{self:?}"
        );
        self.json()["type"].as_str().unwrap().to_owned()
    }

    /// `error.code` of a provider-style error answer.
    fn error_code(&self) -> String {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{self:?}"
        );
        self.json()["error"]["code"].as_str().unwrap().to_owned()
    }
}

// ---------------------------------------------------------------------------------
// kycert

#[tokio::test]
async fn kycert() {
    let (api, up) = api_upstream().await;
    let idem = start_provider("kycert", up);
    let path = "/api/v1/bureau/runs";
    let route = "POST /api/v1/bureau/runs";
    let api_key = "sk_live_alice";
    let run = |key: &str, doc: &str| {
        Req::post(idem.url(path))
            .h("x-api-key", api_key)
            .h("idempotency-key", key)
            .h("x-test-status", "202")
            .body(&format!(
                r#"{{ "template_id": "tpl_1", "subject": {{ "type": "pf", "doc": "{doc}" }} }}"#
            ))
    };
    // The page's own example key (a version-1 UUID, although the page asks for v4).
    let example = "6ba7b810-9dad-11d1-80b4-00c04fd430c8";

    let first = run(example, "12345678901").send().await;
    // "if (res.status === 202 || res.status === 200) { return await res.json() }"
    assert_eq!(first.status, 202, "{first:?}");
    // "Mesma chave nas próximas 24h: retorna o run original (mesma resposta, mesmo run_id)"
    let retry = run(example, "12345678901").send().await;
    assert_eq!(retry.status, 202);
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body, "same answer, same run id");
    assert_eq!(api.runs("POST", path, example), 1);
    // "se o run já foi criado com aquela chave, o kycert retorna o resultado original sem
    // executar novamente"
    assert_eq!(retry.json()["id"], first.json()["id"]);

    // "Chave diferente: cria um novo run"
    let v4 = "0b0a3c0e-5a7e-4d39-9b7a-3f6c2a1d9e11";
    let other = run(v4, "12345678901").send().await;
    assert_eq!(other.status, 202);
    assert!(!other.replayed());
    assert_ne!(other.json()["id"], first.json()["id"]);
    assert_eq!(api.runs("POST", path, v4), 1);

    // "Se você reutilizar a mesma chave para runs diferentes, poderá receber um resultado
    // incorreto": idem refuses the reuse instead of answering with another run.
    let reused = run(v4, "99999999999").send().await;
    assert_eq!(reused.status, 422);
    assert_eq!(api.runs("POST", path, v4), 1, "no second run");
    // "throw new Error(`${err.error.code}: ${err.error.message}`)": the provider object.
    assert_eq!(reused.error_code(), "idempotency_key_conflict");
    assert!(reused.json()["error"]["message"].is_string());
    // "4xx sem Retry-After → não tentar novamente"
    assert!(reused.header("retry-after").is_none());

    // A concurrent duplicate is a 4xx *with* Retry-After: the page's client retries it,
    // with the same key ("Use a mesma chave em todos os retries da mesma tentativa").
    let held = "5f0e7a4c-1d2b-4c3a-8e9f-0a1b2c3d4e5f";
    let running = run(held, "11111111111").h("x-test-hold", "1").spawn();
    api.until_running("POST", path, held).await;
    let dup = run(held, "11111111111").send().await;
    assert_eq!(dup.status, 409);
    assert_eq!(dup.error_code(), "idempotency_key_in_use");
    assert!(dup.header("retry-after").is_some());
    api.release_one();
    let done = running.await.unwrap();
    assert_eq!(done.status, 202);
    let again = run(held, "11111111111").send().await;
    assert!(again.replayed());
    assert_eq!(again.body, done.body);
    assert_eq!(api.runs("POST", path, held), 1);

    // "Chave expirada (>24h): cria um novo run como se fosse a primeira vez"
    assert_eq!(idem.retention_hours(route, example, api_key).await, 24);
    idem.purge(route, example, api_key).await;
    let fresh = run(example, "12345678901").send().await;
    assert_eq!(fresh.status, 202);
    assert!(!fresh.replayed());
    assert_eq!(api.runs("POST", path, example), 2);
}

// ---------------------------------------------------------------------------------
// Kobana

#[tokio::test]
async fn kobana() {
    let (api, up) = api_upstream().await;
    let idem = start_provider("kobana", up);
    let path = "/v1/bank_billets";
    let token = "Bearer kobana_token_alice";
    let billet = |amount: &str| {
        format!(
            r#"{{"bank_billet":{{"amount":{amount}, "expire_at": "2021-11-15", "customer_person_name": "Nome do Cliente"}}}}"#
        )
    };
    let create = |key: &str, amount: &str| {
        Req::post(idem.url(path))
            .h("authorization", token)
            .h("x-idempotency-key", key)
            .body(&billet(amount))
    };

    // "forneça um cabeçalho X-Idempotency-Key: <key> adicional à solicitação"
    let example = "4wE7HVG5rW3R7Xg1";
    let first = create(example, "12.34").send().await;
    assert_eq!(first.status, 201);
    // "Solicitações subsequentes com a mesma chave retornam o mesmo resultado"
    let retry = create(example, "12.34").send().await;
    assert_eq!((retry.status, retry.replayed()), (201, true));
    // The key is echoed under the header the route accepts.
    assert!(retry.header("x-idempotency-key").is_some());
    assert_eq!(retry.body, first.body);
    assert_eq!(api.runs("POST", path, example), 1);
    // The page names only X-Idempotency-Key: a plain Idempotency-Key has no effect.
    for _ in 0..2 {
        let plain = Req::post(idem.url(path))
            .h("authorization", token)
            .h("idempotency-key", "plain-header-1")
            .body(&billet("1.00"))
            .send()
            .await;
        assert!(!plain.replayed());
    }
    assert_eq!(api.runs("POST", path, "plain-header-1"), 2);

    // "A camada de idempotência compara os parâmetros de entrada com os da solicitação
    // original e os erros, a menos que sejam os mesmos"
    let misuse = create(example, "99.99").send().await;
    assert_eq!(misuse.status, 422);
    assert!(misuse.problem_type().ends_with("idempotency-key-reused"));
    assert_eq!(api.runs("POST", path, example), 1);

    // "salvando o código de status resultante e o corpo da primeira solicitação ...
    // independentemente de ter sido bem-sucedida ou falhada. Solicitações subsequentes
    // com a mesma chave retornam o mesmo resultado, incluindo erros 500."
    let boom = create("kobana-500", "5.00").h("x-test-status", "500");
    let failed = boom.clone().send().await;
    assert_eq!(failed.status, 500);
    let replayed = boom.send().await;
    assert_eq!((replayed.status, replayed.replayed()), (500, true));
    assert_eq!(replayed.body, failed.body);
    assert_eq!(api.runs("POST", path, "kobana-500"), 1);

    // "Se os parâmetros de entrada falharem na validação ... nenhum resultado idempotente
    // será salvo porque nenhum endpoint da API iniciou a execução. É seguro repetir
    // essas solicitações."
    for status in ["400", "422"] {
        let key = format!("kobana-invalid-{status}");
        let invalid = create(&key, "-1").h("x-test-status", status).send().await;
        assert_eq!(invalid.status.to_string(), status);
        let corrected = create(&key, "10.00").send().await;
        assert_eq!((corrected.status, corrected.replayed()), (201, false));
        assert_eq!(api.runs("POST", path, &key), 2, "the corrected retry ran");
    }

    // "... ou a solicitação entrar em conflito com outra que estava sendo executada
    // simultaneamente, nenhum resultado idempotente será salvo ... É seguro repetir"
    let running = create("kobana-busy", "7.00").h("x-test-hold", "1").spawn();
    api.until_running("POST", path, "kobana-busy").await;
    let conflict = create("kobana-busy", "7.00").send().await;
    assert_eq!(conflict.status, 409);
    assert!(conflict.problem_type().ends_with("idempotency-key-in-use"));
    api.release_one();
    let done = running.await.unwrap();
    assert_eq!(done.status, 201);
    let repeated = create("kobana-busy", "7.00").send().await;
    assert_eq!((repeated.status, repeated.replayed()), (201, true));
    assert_eq!(repeated.body, done.body);
    assert_eq!(api.runs("POST", path, "kobana-busy"), 1);

    // "Todas as solicitações POST, PUT e PATCH aceitam chaves de idempotência."
    for method in [Method::PUT, Method::PATCH] {
        let key = format!("kobana-{method}");
        for _ in 0..2 {
            let res = Req::new(method.clone(), idem.url("/v1/bank_billets/42"))
                .h("authorization", token)
                .h("content-type", "application/json")
                .h("x-idempotency-key", &key)
                .body(r#"{"bank_billet":{"amount":1}}"#)
                .send()
                .await;
            assert_eq!(res.status, 200);
        }
        assert_eq!(api.runs(method.as_str(), "/v1/bank_billets/42", &key), 1);
    }
    // "O envio de chaves de idempotência em solicitações GET e DELETE não tem efeito"
    for method in [Method::GET, Method::DELETE] {
        let key = format!("kobana-{method}");
        for _ in 0..2 {
            let res = Req::new(method.clone(), idem.url("/v1/bank_billets/42"))
                .h("authorization", token)
                .h("x-idempotency-key", &key)
                .send()
                .await;
            assert!(!res.replayed());
        }
        assert_eq!(api.runs(method.as_str(), "/v1/bank_billets/42", &key), 2);
    }

    // "As chaves de idempotência podem ter até 255 caracteres."
    let longest = "k".repeat(255);
    assert_eq!(create(&longest, "1.00").send().await.status, 201);
    let too_long = "k".repeat(256);
    let refused = create(&too_long, "1.00").send().await;
    assert_eq!(refused.status, 400);
    assert!(refused.problem_type().ends_with("idempotency-key-invalid"));
    assert_eq!(api.runs("POST", path, &too_long), 0);

    // "As chaves são qualificadas para serem removidas do sistema automaticamente após
    // terem pelo menos 72 horas de uso, e uma nova solicitação será gerada se uma chave
    // for reutilizada após a remoção da original."
    let route = format!("POST {path}");
    assert_eq!(idem.retention_hours(&route, example, token).await, 72);
    idem.purge(&route, example, token).await;
    let anew = create(example, "12.34").send().await;
    assert_eq!((anew.status, anew.replayed()), (201, false));
    assert_eq!(api.runs("POST", path, example), 2);
}

// ---------------------------------------------------------------------------------
// iugu

#[tokio::test]
async fn iugu() {
    let (api, up) = api_upstream().await;
    let idem = start_provider("iugu", up);
    let path = "/v1/invoices";
    let auth = "Basic dGVzdF9hcGlfdG9rZW46";
    let invoice = |email: &str| {
        format!(
            r#"{{ "email": "{email}", "due_date": "2021-12-10", "ensure_workday_due_date": false,
                 "items": [ {{ "description": "Item teste", "quantity": 1, "price_cents": 1000 }} ],
                 "payable_with": [ "all" ] }}"#
        )
    };
    let create = |path: &str, key: &str, email: &str| {
        Req::post(idem.url(path))
            .h("accept", "application/json")
            .h("authorization", auth)
            // "deve ser enviada no header da requisição no parâmetro chamado Idempotency-Key"
            .h("idempotency-key", key)
            .body(&invoice(email))
    };
    let key = "my_key00000001";

    // "Se ocorrer várias requisições com a mesma informação no mesmo instante, uma delas
    // será processada com sucesso e se outra requisição for enviada com a mesma chave,
    // será retornado o erro 409."
    let first = create(path, key, "a@example.com")
        .h("x-test-hold", "1")
        .spawn();
    api.until_running("POST", path, key).await;
    let same_instant = create(path, key, "a@example.com").send().await;
    assert_eq!(same_instant.status, 409);
    assert!(
        same_instant
            .problem_type()
            .ends_with("idempotency-key-in-use")
    );
    api.release_one();
    let first = first.await.unwrap();
    assert_eq!(first.status, 201, "one of them is processed successfully");
    // "apenas uma requisição será processada"
    assert_eq!(api.runs("POST", path, key), 1);

    // "... se outra requisição for enviada com a mesma chave, será retornado o erro 409"
    let other = create(path, key, "b@example.com").send().await;
    assert_eq!(other.status, 409);
    assert!(other.problem_type().ends_with("idempotency-key-reused"));
    assert_eq!(api.runs("POST", path, key), 1);
    // The same request again, once the first has finished: idem answers with the
    // first result rather than an error (see docs/providers.md); it still runs once.
    let retry = create(path, key, "a@example.com").send().await;
    assert_eq!((retry.status, retry.replayed()), (201, true));
    assert_eq!(retry.body, first.body);
    assert_eq!(api.runs("POST", path, key), 1);

    // "A API iugu aceita a chave nas chamadas de Criar fatura, Criar assinatura,
    // Transferência para Terceiros, Criar Pedido de Pagamento, Criar cliente e realizar
    // Cobrança direta."
    for call in [
        "/v1/subscriptions",
        "/v1/transfers",
        "/v1/payment_requests",
        "/v1/customers",
        "/v1/charge",
    ] {
        for _ in 0..2 {
            assert_eq!(create(call, key, "a@example.com").send().await.status, 201);
        }
        assert_eq!(api.runs("POST", call, key), 1, "{call} runs once");
    }
    // Elsewhere the key has no effect.
    for _ in 0..2 {
        let plan = create("/v1/plans", key, "a@example.com").send().await;
        assert!(!plan.replayed());
    }
    assert_eq!(api.runs("POST", "/v1/plans", key), 2);
}

// ---------------------------------------------------------------------------------
// TXCloud

#[tokio::test]
async fn txcloud() {
    let (api, up) = api_upstream().await;
    let idem = start_provider("txcloud", up);
    let path = "/v1/identity/verify";
    let bearer = "Bearer txc_api_key_alice";
    let verify = |path: &str, auth: &str, key: &str, country: &str| {
        Req::post(idem.url(path))
            .h("authorization", auth)
            .h("idempotency-key", key)
            .h("x-test-status", "200")
            .body(&format!(
                r#"{{"document_front": "...", "country": "{country}"}}"#
            ))
    };
    let key = "user_123_verification_attempt_1";

    // "First request: Processed normally, result stored"
    let first = verify(path, bearer, key, "MA").send().await;
    assert_eq!(first.status, 200);
    assert!(!first.replayed());
    let request_id = first.header("x-request-id").unwrap().to_owned();
    assert!(request_id.starts_with("req_"), "the upstream's own id");
    // "Subsequent requests: Return cached result immediately"
    let cached = verify(path, bearer, key, "MA").send().await;
    assert_eq!(cached.status, 200);
    assert_eq!(cached.body, first.body);
    assert_eq!(api.runs("POST", path, key), 1);
    // "When a cached response is returned, TXCloud includes: Idempotency-Key: abc123,
    // Idempotent-Replayed: true, X-Request-Id: req_original_123"
    // "`Idempotent-Replayed` | `true` if response was cached"
    assert_eq!(cached.header("idempotent-replayed"), Some("true"));
    assert_eq!(cached.header("idempotency-key"), Some(key));
    // "`X-Request-Id` | ID of the original request"
    assert_eq!(cached.header("x-request-id"), Some(request_id.as_str()));

    // "If you send the same key with **different request bodies**, you'll get an error:
    // {"error": {"code": "idempotency_key_conflict", "message": "...", "type":
    // "invalid_request_error"}}"
    let conflict = verify(path, bearer, key, "FR").send().await;
    assert_eq!(conflict.error_code(), "idempotency_key_conflict");
    let err = &conflict.json()["error"];
    assert_eq!(err["type"], "invalid_request_error");
    assert!(err["message"].is_string());
    assert_eq!(conflict.status, 422);
    assert_eq!(api.runs("POST", path, key), 1);

    // "Keys are scoped to: Your API key; The endpoint being called. This means the same
    // key can be used on different endpoints without conflict."
    let kyb = verify("/v1/kyb/verify", bearer, key, "FR").send().await;
    assert_eq!((kyb.status, kyb.replayed()), (200, false));
    assert_eq!(api.runs("POST", "/v1/kyb/verify", key), 1);
    let bob = verify(path, "Bearer txc_api_key_bob", key, "FR")
        .send()
        .await;
    assert_eq!(
        (bob.status, bob.replayed()),
        (200, false),
        "another API key"
    );
    assert_eq!(api.runs("POST", path, key), 2);

    // "Length: 10-255 characters"; "Characters: Alphanumeric, hyphens, underscores"
    for good in [
        "abcdefghij".to_owned(),
        "k".repeat(255),
        // "Good examples: order_456_payment_attempt_1, 550e8400-e29b-41d4-a716-446655440000"
        "order_456_payment_attempt_1".to_owned(),
        "550e8400-e29b-41d4-a716-446655440000".to_owned(),
    ] {
        let res = verify(path, bearer, &good, "MA").send().await;
        assert_eq!(res.status, 200, "{good}: {res:?}");
    }
    for bad in [
        "abcdefghi".to_owned(),
        "k".repeat(256),
        "has.a.dot.in.it".to_owned(),
        "with space here".to_owned(),
        // The page's third "good example" breaks its own character rule (':').
        "user_123_verify_2025-01-15T10:30:00Z".to_owned(),
    ] {
        let res = verify(path, bearer, &bad, "MA").send().await;
        assert_eq!(res.status, 400, "{bad}");
        assert_eq!(res.error_code(), "idempotency_key_invalid");
        assert_eq!(api.runs("POST", path, &bad), 0);
    }

    // "Endpoints Supporting Idempotency: POST /identity/verify, POST /identity/sessions,
    // POST /transactions/score, POST /lending/assess, POST /kyb/verify,
    // POST /watchlist/screen"
    for endpoint in [
        "/v1/identity/sessions",
        "/v1/transactions/score",
        "/v1/lending/assess",
        "/v1/watchlist/screen",
    ] {
        for _ in 0..2 {
            verify(endpoint, bearer, key, "MA").send().await;
        }
        assert_eq!(api.runs("POST", endpoint, key), 1, "{endpoint}");
    }
    // "GET endpoints ❌ Already idempotent"; "DELETE endpoints ❌ Already idempotent"
    for method in [Method::GET, Method::DELETE] {
        for _ in 0..2 {
            let res = Req::new(method.clone(), idem.url("/v1/identity/sessions/s_1"))
                .h("authorization", bearer)
                .h("idempotency-key", key)
                .send()
                .await;
            assert!(!res.replayed());
        }
        assert_eq!(
            api.runs(method.as_str(), "/v1/identity/sessions/s_1", key),
            2
        );
    }

    // "Idempotency keys are stored for **24 hours**. After expiration: The same key can
    // be reused; The request will be processed as new"
    let route = format!("POST {path}");
    assert_eq!(idem.retention_hours(&route, key, bearer).await, 24);
    idem.purge(&route, key, bearer).await;
    let anew = verify(path, bearer, key, "FR").send().await;
    assert_eq!((anew.status, anew.replayed()), (200, false));
    assert_eq!(api.runs("POST", path, key), 3);
}

// ---------------------------------------------------------------------------------
// IETF draft-ietf-httpapi-idempotency-key-header

#[tokio::test]
async fn ietf_draft() {
    let (api, up) = api_upstream().await;
    let idem = start_provider("ietf", up);
    let path = "/v1/orders";
    let bearer = "Bearer ietf_client";
    let order = |key: Option<&str>, item: &str| {
        let mut r = Req::post(idem.url(path)).h("authorization", bearer);
        if let Some(k) = key {
            r = r.h("idempotency-key", k);
        }
        r.body(&format!(r#"{{"item":"{item}"}}"#))
    };

    // "If the `Idempotency-Key` request header is missing for a documented idempotent
    // operation requiring this header, the resource server SHOULD reply with an HTTP
    // `400` status code" ... "describing the problem using RFC 7807"
    let missing = order(None, "book").send().await;
    assert_eq!(missing.status, 400);
    assert!(missing.problem_type().ends_with("idempotency-key-missing"));
    assert_eq!(api.runs("POST", path, ""), 0);

    // "`Idempotency-Key` is an Item Structured Header. Its value MUST be a String."
    // "Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324""
    let quoted = r#""8e03978e-40d5-43e8-bc93-6894a57f9324""#;
    let bare = "8e03978e-40d5-43e8-bc93-6894a57f9324";
    // "First time request ... The resource server SHOULD process the request normally"
    let first = order(Some(quoted), "book").send().await;
    assert_eq!(first.status, 201);
    // "Retry: The request was retried after the original request completed. The resource
    // server SHOULD respond with the result of the previously completed operation"
    let retry = order(Some(quoted), "book").send().await;
    assert_eq!((retry.status, retry.replayed()), (201, true));
    assert_eq!(retry.body, first.body);
    // idem also accepts the bare form of the same key (SPEC §1).
    let bare_retry = order(Some(bare), "book").send().await;
    assert_eq!(bare_retry.body, first.body);
    assert_eq!(api.runs("POST", path, quoted), 1);
    assert_eq!(api.runs("POST", path, bare), 0);
    // A string that is not a well-formed sf-string is refused.
    let broken = order(Some(r#""8e03978e"#), "book").send().await;
    assert_eq!(broken.status, 400);
    assert!(broken.problem_type().ends_with("idempotency-key-invalid"));

    // "If there is an attempt to reuse an idempotency key with a different request
    // payload, the resource server SHOULD reply with a HTTP `422` status code"
    let reused = order(Some(quoted), "car").send().await;
    assert_eq!(reused.status, 422);
    assert!(reused.problem_type().ends_with("idempotency-key-reused"));
    assert_eq!(api.runs("POST", path, quoted), 1);

    // "If the request is retried, while the original request is still being processed,
    // the resource server SHOULD reply with an HTTP `409` status code with body
    // containing problem description."
    let running = order(Some("\"concurrent-1\""), "pen")
        .h("x-test-hold", "1")
        .spawn();
    api.until_running("POST", path, "\"concurrent-1\"").await;
    let concurrent = order(Some("\"concurrent-1\""), "pen").send().await;
    assert_eq!(concurrent.status, 409);
    assert!(
        concurrent
            .problem_type()
            .ends_with("idempotency-key-in-use")
    );
    api.release_one();
    assert_eq!(running.await.unwrap().status, 201);
    assert_eq!(api.runs("POST", path, "\"concurrent-1\""), 1);

    // "Clients MUST NOT include more than one `Idempotency-Key` header field in the same
    // request."
    let twice = order(Some("\"a-1\""), "pen")
        .h("idempotency-key", "\"a-1\"")
        .send()
        .await;
    assert_eq!(twice.status, 400);
    assert_eq!(api.runs("POST", path, "\"a-1\""), 0);

    // "... respond with the result of the previously completed operation, success or an
    // error."
    let failing = order(Some("\"fails-1\""), "pen").h("x-test-status", "500");
    let failed = failing.clone().send().await;
    assert_eq!(failed.status, 500);
    let again = failing.send().await;
    assert_eq!((again.status, again.replayed()), (500, true));
    assert_eq!(api.runs("POST", path, "\"fails-1\""), 1);

    // "make non-idempotent HTTP methods such as `POST` or `PATCH` fault-tolerant";
    // "the methods `OPTIONS`, `HEAD`, `GET`, `PUT` and `DELETE` are idempotent".
    for _ in 0..2 {
        let patch = Req::new(Method::PATCH, idem.url("/v1/orders/1"))
            .h("authorization", bearer)
            .h("content-type", "application/json")
            .h("idempotency-key", "\"patch-1\"")
            .body(r#"{"item":"pen"}"#)
            .send()
            .await;
        assert_eq!(patch.status, 200);
    }
    assert_eq!(api.runs("PATCH", "/v1/orders/1", "\"patch-1\""), 1);
    let put = Req::new(Method::PUT, idem.url("/v1/orders/1"))
        .h("authorization", bearer)
        .body(r#"{"item":"pen"}"#)
        .send()
        .await;
    assert_eq!(put.status, 200, "no key required on PUT");

    // "The resource server SHOULD define such expiration policy and publish it in the
    // documentation": 24 hours, in ietf.toml.
    let route = format!("POST {path}");
    assert_eq!(idem.retention_hours(&route, bare, bearer).await, 24);
}

// ---------------------------------------------------------------------------------
// Stripe

#[tokio::test]
async fn stripe() {
    let (api, up) = api_upstream().await;
    let idem = start_provider("stripe", up);
    let path = "/v1/charges";
    let sk = "Bearer sk_test_alice";
    let charge = |key: &str, amount: u32| {
        Req::post(idem.url(path))
            .h("authorization", sk)
            .h("idempotency-key", key)
            .body(&format!(r#"{{"amount":{amount},"currency":"usd"}}"#))
    };

    let first = charge("st-1", 2000).send().await;
    assert_eq!(first.status, 201);
    let retry = charge("st-1", 2000).send().await;
    assert_eq!((retry.status, retry.replayed()), (201, true));
    assert_eq!(retry.body, first.body);
    assert_eq!(api.runs("POST", path, "st-1"), 1);

    // "The idempotency layer compares incoming parameters to those of the original
    // request and errors if they're not the same to prevent accidental misuse."
    let misuse = charge("st-1", 9999).send().await;
    assert_eq!(misuse.status, 400);
    assert_eq!(misuse.error_code(), "idempotency_key_conflict");
    assert_eq!(api.runs("POST", path, "st-1"), 1);

    // "saving the resulting status code and body of the first request ... regardless of
    // whether it succeeds or fails. Subsequent requests with the same key return the
    // same result, including 500 errors."
    let boom = charge("st-500", 100).h("x-test-status", "500");
    let failed = boom.clone().send().await;
    let replayed = boom.send().await;
    assert_eq!((failed.status, replayed.status), (500, 500));
    assert!(replayed.replayed());
    assert_eq!(replayed.body, failed.body);
    assert_eq!(api.runs("POST", path, "st-500"), 1);

    // "If incoming parameters fail validation, or the request conflicts with another
    // request that's executing concurrently, we don't save the idempotent result ...
    // You can retry these requests."
    let invalid = charge("st-invalid", 0)
        .h("x-test-status", "400")
        .send()
        .await;
    assert_eq!(invalid.status, 400);
    let fixed = charge("st-invalid", 100).send().await;
    assert_eq!((fixed.status, fixed.replayed()), (201, false));
    assert_eq!(api.runs("POST", path, "st-invalid"), 2);
    let running = charge("st-busy", 100).h("x-test-hold", "1").spawn();
    api.until_running("POST", path, "st-busy").await;
    let busy = charge("st-busy", 100).send().await;
    assert_eq!(busy.status, 409);
    assert_eq!(busy.error_code(), "idempotency_key_in_use");
    api.release_one();
    let done = running.await.unwrap();
    let later = charge("st-busy", 100).send().await;
    assert_eq!((later.status, later.replayed()), (201, true));
    assert_eq!(later.body, done.body);
    assert_eq!(api.runs("POST", path, "st-busy"), 1);

    // "Idempotency keys are up to 255 characters long."
    assert_eq!(charge(&"s".repeat(255), 1).send().await.status, 201);
    let long = "s".repeat(256);
    let refused = charge(&long, 1).send().await;
    assert_eq!(refused.status, 400);
    assert_eq!(refused.error_code(), "idempotency_key_invalid");
    assert_eq!(api.runs("POST", path, &long), 0);

    // "All POST requests accept idempotency keys. Don't send idempotency keys in GET and
    // DELETE requests because it has no effect."
    for method in [Method::GET, Method::DELETE, Method::PATCH] {
        for _ in 0..2 {
            let res = Req::new(method.clone(), idem.url("/v1/charges/ch_1"))
                .h("authorization", sk)
                .h("idempotency-key", "st-read")
                .send()
                .await;
            assert!(!res.replayed());
        }
        assert_eq!(api.runs(method.as_str(), "/v1/charges/ch_1", "st-read"), 2);
    }

    // "You can remove keys from the system automatically after they're at least 24 hours
    // old. We generate a new request if a key is reused after the original is pruned."
    let route = format!("POST {path}");
    assert_eq!(idem.retention_hours(&route, "st-1", sk).await, 24);
    idem.purge(&route, "st-1", sk).await;
    let anew = charge("st-1", 9999).send().await;
    assert_eq!((anew.status, anew.replayed()), (201, false));
    assert_eq!(api.runs("POST", path, "st-1"), 2);
}

// ---------------------------------------------------------------------------------
// Every shipped file passes `idem check-config`

#[test]
fn check_config_accepts_every_provider_file() {
    for provider in ["kycert", "kobana", "iugu", "txcloud", "ietf", "stripe"] {
        let path = config_path(provider);
        let out = Command::new(common::binary())
            .arg("check-config")
            .arg(&path)
            .env("IDEM_TENANT_SECRET", TENANT_SECRET)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{provider}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains(": ok ("), "{provider}: {stdout}");
    }
}
