//! A small payments API: `POST /v1/charges`, `GET /v1/charges/{id}`, `POST /v1/refunds`,
//! protected by the idem Tower layer on the SQLite store. See README.md.
//!
//! `payments [--listen ADDR] [--db PATH] [--plain] [--memory] [--optional-keys]`:
//! `--plain` serves the API without the layer (to put the `idem` sidecar in front of
//! it instead); `--memory` keeps records in memory instead of SQLite, and
//! `--optional-keys` lets requests without a key through unprotected (both used by
//! the benchmark kit to measure what the layer itself costs).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use idem::policy::KeyRequirement;
use idem::tower::NoStore;
use idem::{IdempotencyLayer, MemoryStore, Policy, Routes, SqliteStore, TenantSecret};
use serde::Deserialize;
use serde_json::json;

#[derive(Default)]
struct Ledger {
    charges: HashMap<String, serde_json::Value>,
    refunded: HashMap<String, i64>,
}

type Db = Arc<Mutex<Ledger>>;

#[derive(Deserialize)]
struct NewCharge {
    amount: i64,
    currency: String,
}

#[derive(Deserialize)]
struct NewRefund {
    charge: String,
    amount: i64,
}

fn invalid(message: &str) -> Response {
    let mut res = (StatusCode::BAD_REQUEST, Json(json!({ "error": message }))).into_response();
    // A validation failure changed nothing: let a corrected retry with the same key run.
    res.extensions_mut().insert(NoStore);
    res
}

async fn create_charge(State(db): State<Db>, Json(req): Json<NewCharge>) -> Response {
    if req.amount <= 0 {
        return invalid("amount must be positive");
    }
    let id = format!("ch_{}", uuid::Uuid::new_v4().simple());
    let charge =
        json!({ "id": id, "amount": req.amount, "currency": req.currency, "status": "succeeded" });
    db.lock()
        .unwrap()
        .charges
        .insert(id.clone(), charge.clone());
    tracing::info!(%id, amount = req.amount, "charged");
    (
        StatusCode::CREATED,
        [("location", format!("/v1/charges/{id}"))],
        Json(charge),
    )
        .into_response()
}

async fn get_charge(State(db): State<Db>, Path(id): Path<String>) -> Response {
    match db.lock().unwrap().charges.get(&id) {
        Some(c) => Json(c.clone()).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": "no such charge" })),
        )
            .into_response(),
    }
}

async fn create_refund(State(db): State<Db>, Json(req): Json<NewRefund>) -> Response {
    let mut ledger = db.lock().unwrap();
    let Some(amount) = ledger
        .charges
        .get(&req.charge)
        .and_then(|c| c["amount"].as_i64())
    else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": "no such charge" })),
        )
            .into_response();
    };
    let already = ledger.refunded.get(&req.charge).copied().unwrap_or(0);
    if req.amount <= 0 || already + req.amount > amount {
        return invalid(
            "refund amount must be positive and at most the charge's unrefunded amount",
        );
    }
    ledger
        .refunded
        .insert(req.charge.clone(), already + req.amount);
    let id = format!("re_{}", uuid::Uuid::new_v4().simple());
    (
        StatusCode::CREATED,
        Json(json!({ "id": id, "charge": req.charge, "amount": req.amount })),
    )
        .into_response()
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// The secret tenants' credentials are hashed with. In production it comes from your
/// secret store; it must be the same on every instance sharing the database.
fn tenant_secret() -> TenantSecret {
    let secret =
        std::env::var("IDEM_TENANT_SECRET").unwrap_or_else(|_| "payments-example-secret".into());
    TenantSecret::new(secret).expect("secret of 16+ bytes")
}

/// Both POST routes require a key (unless `--optional-keys`).
fn protected_routes() -> Routes {
    let key = if std::env::args().any(|a| a == "--optional-keys") {
        KeyRequirement::Optional
    } else {
        KeyRequirement::Required
    };
    let policy = Policy::default().with_key(key);
    Routes::default()
        .route(
            Some(axum::http::Method::POST),
            "/v1/charges",
            policy.clone(),
        )
        .and_then(|r| r.route(Some(axum::http::Method::POST), "/v1/refunds", policy))
        .expect("valid routes")
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let listen = arg("--listen").unwrap_or_else(|| "127.0.0.1:3000".into());
    let plain = std::env::args().any(|a| a == "--plain");

    let api = Router::new()
        .route("/v1/charges", post(create_charge))
        .route("/v1/charges/{id}", get(get_charge))
        .route("/v1/refunds", post(create_refund))
        .with_state(Db::default());

    let (app, executions) = if plain {
        (api, None)
    } else {
        let (secret, routes) = (tenant_secret(), protected_routes());
        if std::env::args().any(|a| a == "--memory") {
            let layer = IdempotencyLayer::new(MemoryStore::new(), secret).with_routes(routes);
            let executions = layer.engine().executions().clone();
            (api.layer(layer), Some(executions))
        } else {
            let db = arg("--db").unwrap_or_else(|| "payments-idem.db".into());
            let store = SqliteStore::open(&db).expect("cannot open the idempotency database");
            let layer = IdempotencyLayer::new(store, secret).with_routes(routes);
            let executions = layer.engine().executions().clone();
            (api.layer(layer), Some(executions))
        }
    };

    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .expect("cannot listen");
    tracing::info!(%listen, protected = !plain, "payments API ready");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .unwrap();
    // Executions whose callers hung up run on in tasks of their own: let them store
    // their outcomes before the process exits, or their retries would run again.
    if let Some(executions) = executions {
        let _ = tokio::time::timeout(Duration::from_secs(60), executions.idle()).await;
    }
}
