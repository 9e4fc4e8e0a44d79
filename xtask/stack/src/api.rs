//! A small REST client for the api-gateway, as a user's script would call it.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

#[derive(Clone, Debug)]
pub struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

/// An answer: status, body, and how long it took.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub latency: Duration,
}

impl Api {
    pub fn new(base: String, token: String) -> Self {
        Self {
            base,
            token,
            http: reqwest::Client::new(),
        }
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Answer> {
        let started = Instant::now();
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let latency = started.elapsed();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(Answer {
            status,
            body,
            latency,
        })
    }

    /// `POST /api/v1/sessions`; returns `(session_id, command_id)` after a 202.
    pub async fn create_session(&self, template: &str) -> anyhow::Result<(String, String)> {
        let a = self
            .call(
                reqwest::Method::POST,
                "/api/v1/sessions",
                Some(serde_json::json!({ "template": template })),
            )
            .await?;
        if a.status != 202 {
            bail!("create session: expected 202, got {} {}", a.status, a.body);
        }
        Ok((str_field(&a.body, "id")?, str_field(&a.body, "command_id")?))
    }

    pub async fn delete_session(&self, id: &str) -> anyhow::Result<Answer> {
        self.call(
            reqwest::Method::DELETE,
            &format!("/api/v1/sessions/{id}"),
            None,
        )
        .await
    }

    pub async fn hibernate(&self, id: &str) -> anyhow::Result<Answer> {
        self.call(
            reqwest::Method::PUT,
            &format!("/api/v1/sessions/{id}/hibernate"),
            None,
        )
        .await
    }

    pub async fn wake(&self, id: &str) -> anyhow::Result<Answer> {
        self.call(
            reqwest::Method::PUT,
            &format!("/api/v1/sessions/{id}/wake"),
            None,
        )
        .await
    }

    pub async fn session(&self, id: &str) -> anyhow::Result<Value> {
        let a = self
            .call(
                reqwest::Method::GET,
                &format!("/api/v1/sessions/{id}"),
                None,
            )
            .await?;
        if a.status != 200 {
            bail!("get session {id}: {} {}", a.status, a.body);
        }
        Ok(a.body)
    }

    pub async fn session_state(&self, id: &str) -> anyhow::Result<String> {
        str_field(&self.session(id).await?, "state")
    }

    /// Polls until the session reaches `state`, failing (with the last state) after `limit`.
    pub async fn wait_state(
        &self,
        id: &str,
        state: &str,
        limit: Duration,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            let now = self.session_state(id).await?;
            if now == state {
                return Ok(started.elapsed());
            }
            if started.elapsed() > limit {
                bail!("session {id}: expected state {state:?} within {limit:?}, still {now:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

pub fn str_field(v: &Value, key: &str) -> anyhow::Result<String> {
    v.get(key)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .with_context(|| format!("no {key:?} in {v}"))
}
