//! The HTTP face: request paths and verbs as the API server lays them out, bearer-token
//! authentication, the audit log, deny rules, lists with selectors and paging, and watch
//! streams.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use crate::apply::Writer;
use crate::ops::{self, DeleteOptions, Subresource, Write};
use crate::patch::PatchType;
use crate::resource::ResourceKind;
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::ApiError;
use crate::store::{Event, EventType, Key};
use crate::{AuditEntry, Shared, stopped};

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/version", get(version))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .merge(crate::hooks::router())
        .fallback(handle)
        .with_state(shared)
}

async fn version() -> impl IntoResponse {
    axum::Json(json!({
        "major": "1", "minor": "33", "gitVersion": "v1.33.0-streamspace-kube-fake",
        "platform": "linux/amd64",
    }))
}

/// What a request path names.
#[derive(Debug)]
struct Target {
    kind: ResourceKind,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<Subresource>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, plural, name, sub) = match rest {
        [plural] => (None, *plural, None, None),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name), None),
        ["namespaces", ns, plural, name, sub] => (Some(*ns), *plural, Some(*name), Some(*sub)),
        _ => return None,
    };
    let kind = ResourceKind::from_path(group, version, plural)?;
    let sub = match sub {
        Some(s) => Some(Subresource::parse(kind, s)?),
        None => None,
    };
    Some(Target {
        kind,
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
        sub,
    })
}

/// Whether the request carries the bearer token.
pub(crate) fn authorized(shared: &Shared, headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| t == shared.token)
}

/// The RBAC verb of a request, as an authorizer would see it.
fn rbac_verb(
    method: &Method,
    target: &Target,
    query: &HashMap<String, String>,
) -> Option<&'static str> {
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    Some(match (method, target.name.is_some()) {
        (&Method::GET, true) => "get",
        (&Method::GET, false) if watch => "watch",
        (&Method::GET, false) => "list",
        (&Method::POST, false) => "create",
        (&Method::PUT, true) => "update",
        (&Method::PATCH, true) => "patch",
        (&Method::DELETE, true) => "delete",
        (&Method::DELETE, false) => "deletecollection",
        _ => return None,
    })
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&shared, &headers) {
        return ApiError::unauthorized().into_response();
    }
    let Some(target) = parse_path(uri.path()) else {
        return ApiError::unknown_path().into_response();
    };
    let query: HashMap<String, String> = Query::try_from_uri(&uri)
        .map(|Query(q)| q)
        .unwrap_or_default();
    let Some(verb) = rbac_verb(&method, &target, &query) else {
        return ApiError::method_not_allowed().into_response();
    };
    if target.sub.is_some() && !matches!(verb, "get" | "update" | "patch") {
        return ApiError::method_not_allowed().into_response();
    }
    let mut entry = AuditEntry {
        verb: verb.to_owned(),
        group: target.kind.group().to_owned(),
        resource: match target.sub {
            Some(sub) => format!("{}/{}", target.kind.plural(), sub.as_str()),
            None => target.kind.plural().to_owned(),
        },
        namespace: target.namespace.clone(),
        name: target.name.clone(),
        code: 0,
    };
    // Flow control sheds load before authorization looks at the request; watches are
    // long-running and exempt here.
    let throttled = verb != "watch" && {
        let mut store = shared.lock();
        let pending = store.throttle > 0;
        if pending {
            store.throttle -= 1;
        }
        pending
    };
    // An apply that would create the object is authorized as `create` as well, as the
    // real API server does (patch permission alone may not create).
    let applies = verb == "patch"
        && target.sub.is_none()
        && headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("application/apply-patch"));
    let (denied_verb, creates) = {
        let store = shared.lock();
        let creates = applies
            && target.namespace.is_some()
            && store
                .get(&(
                    target.kind,
                    target.namespace.clone().unwrap_or_default(),
                    target.name.clone().unwrap_or_default(),
                ))
                .is_none();
        let denies = |v: &str| {
            store
                .settings
                .denials
                .iter()
                .any(|d| d.matches(v, &entry.resource))
        };
        let denied_verb = if denies(verb) {
            Some(verb)
        } else if creates && denies("create") {
            Some("create")
        } else {
            None
        };
        (denied_verb, creates)
    };
    let response = if throttled {
        ApiError::too_many_requests().into_response()
    } else if let Some(denied) = denied_verb {
        ApiError::forbidden(
            &shared.user,
            denied,
            target.kind,
            target.sub.map(Subresource::as_str),
            target.namespace.as_deref(),
            target.name.as_deref(),
        )
        .into_response()
    } else if verb == "watch" {
        watch(&shared, &target, &query).unwrap_or_else(IntoResponse::into_response)
    } else {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let manager = field_manager(&query, &headers);
        let write = Write {
            writer: Writer {
                manager: &manager,
                apply: verb == "patch"
                    && content_type.starts_with("application/apply-patch")
                    && target.sub.is_none(),
                subresource: target.sub.map(Subresource::as_str),
            },
            dry_run: dry_run(&query),
        };
        let result = serve(&shared, verb, &target, &query, content_type, &body, &write);
        // Every write may give the controllers work; a spurious wake-up is harmless.
        if verb != "get" && verb != "list" {
            shared.wake.notify_one();
        }
        match result {
            Ok((code, value)) => (code, axum::Json(value)).into_response(),
            Err(e) => e.into_response(),
        }
    };
    entry.code = response.status().as_u16();
    tracing::debug!(verb, resource = %entry.resource, name = ?entry.name, code = entry.code, "request");
    let mut store = shared.lock();
    if creates && !throttled {
        // The second authorization of a creating apply, as an audit log would show it.
        store.audit.push(AuditEntry {
            verb: "create".to_owned(),
            ..entry.clone()
        });
    }
    store.audit.push(entry);
    drop(store);
    response
}

fn dry_run(query: &HashMap<String, String>) -> bool {
    query.get("dryRun").is_some_and(|v| v == "All")
}

/// The field manager of a write: the `fieldManager` parameter, else what the API server
/// derives from the user agent (its product name, before the first `/`).
fn field_manager(query: &HashMap<String, String>, headers: &HeaderMap) -> String {
    if let Some(m) = query.get("fieldManager").filter(|m| !m.is_empty()) {
        return m.clone();
    }
    headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|ua| ua.split('/').next())
        .filter(|m| !m.is_empty())
        .unwrap_or("unknown")
        .chars()
        .take(128)
        .collect()
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding request body: {e}")))
}

fn serve(
    shared: &Shared,
    verb: &str,
    target: &Target,
    query: &HashMap<String, String>,
    content_type: &str,
    body: &[u8],
    write: &Write<'_>,
) -> Result<(StatusCode, Value), ApiError> {
    let kind = target.kind;
    let ns = target.namespace.clone().unwrap_or_default();
    let key = || -> Key { (kind, ns.clone(), target.name.clone().unwrap_or_default()) };
    let mut store = shared.lock();
    match verb {
        "get" => {
            let object = ops::get(&store, &key())?;
            Ok((
                StatusCode::OK,
                match target.sub {
                    Some(Subresource::Scale) => ops::scale_of(object),
                    _ => object.clone(),
                },
            ))
        }
        "list" => list(&store, target, query),
        "create" => {
            if target.namespace.is_none() {
                return Err(ApiError::method_not_allowed());
            }
            let object = parse_body(body)?;
            ops::create(&mut store, kind, &ns, object, write).map(|o| (StatusCode::CREATED, o))
        }
        "update" => {
            let object = parse_body(body)?;
            ops::replace(&mut store, &key(), target.sub, object, write).map(|o| (StatusCode::OK, o))
        }
        "patch" => {
            let ty = PatchType::from_content_type(content_type)
                .ok_or_else(|| ApiError::unsupported_media_type(content_type))?;
            if ty == PatchType::Apply && !query.contains_key("fieldManager") {
                return Err(ApiError::bad_request(
                    "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                ));
            }
            ops::patch(&mut store, &key(), target.sub, ty, body, write)
        }
        "delete" => {
            let options = delete_options(body, query)?;
            ops::delete(&mut store, &key(), &options)
        }
        "deletecollection" => {
            let options = delete_options(body, query)?;
            let (_, listed) = list(&store, target, query)?;
            let mut deleted = Vec::new();
            for item in listed["items"].as_array().into_iter().flatten() {
                let key = crate::store::key_of(kind, item);
                ops::delete(&mut store, &key, &options)?;
                deleted.push(item.clone());
            }
            Ok((
                StatusCode::OK,
                list_body(kind, store.current_rv(), deleted, None),
            ))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

fn delete_options(body: &[u8], query: &HashMap<String, String>) -> Result<DeleteOptions, ApiError> {
    let mut options: DeleteOptions = if body.iter().all(u8::is_ascii_whitespace) {
        DeleteOptions::default()
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding DeleteOptions: {e}")))?
    };
    if let Some(p) = query.get("propagationPolicy") {
        options.propagation_policy = Some(p.clone());
    }
    if query.get("dryRun").is_some_and(|v| v == "All") {
        options.dry_run = vec!["All".into()];
    }
    Ok(options)
}

fn selectors(
    kind: ResourceKind,
    query: &HashMap<String, String>,
) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))?;
    let fields = FieldSelector::parse(kind, query.get("fieldSelector").map_or("", String::as_str))?;
    Ok((labels, fields))
}

/// Items of a list carry no `kind`/`apiVersion`, as in the real API's typed lists.
fn list_item(object: &Value) -> Value {
    let mut item = object.clone();
    if let Some(map) = item.as_object_mut() {
        map.remove("kind");
        map.remove("apiVersion");
    }
    item
}

fn list_body(
    kind: ResourceKind,
    rv: u64,
    items: Vec<Value>,
    cont: Option<(String, usize)>,
) -> Value {
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if let Some((token, remaining)) = cont {
        metadata["continue"] = json!(token);
        metadata["remainingItemCount"] = json!(remaining);
    }
    json!({
        "kind": format!("{}List", kind.kind()),
        "apiVersion": kind.api_version(),
        "metadata": metadata,
        "items": items,
    })
}

fn list(
    store: &crate::store::Store,
    target: &Target,
    query: &HashMap<String, String>,
) -> Result<(StatusCode, Value), ApiError> {
    let (labels, fields) = selectors(target.kind, query)?;
    let limit = match query.get("limit") {
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
        None => 0,
    };
    // The continue token is the `namespace/name` key the previous page ended at. Unlike
    // the real server, later pages are not a consistent snapshot of the first.
    let after = query.get("continue").filter(|c| !c.is_empty()).cloned();
    let matching: Vec<&Value> = store
        .list(target.kind, target.namespace.as_deref())
        .into_iter()
        .filter(|o| labels.matches(o) && fields.matches(o))
        .filter(|o| {
            after.as_deref().is_none_or(|a| {
                let (_, ns, name) = crate::store::key_of(target.kind, o);
                format!("{ns}/{name}").as_str() > a
            })
        })
        .collect();
    let (page, cont) = if limit > 0 && matching.len() > limit {
        let last = crate::store::key_of(target.kind, matching[limit - 1]);
        (
            &matching[..limit],
            Some((format!("{}/{}", last.1, last.2), matching.len() - limit)),
        )
    } else {
        (&matching[..], None)
    };
    let items = page.iter().map(|o| list_item(o)).collect();
    Ok((
        StatusCode::OK,
        list_body(target.kind, store.current_rv(), items, cont),
    ))
}

fn event_line(ty: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({ "type": ty, "object": object })).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn bookmark(kind: ResourceKind, rv: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if initial_events_end {
        metadata["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
    }
    event_line(
        "BOOKMARK",
        &json!({ "kind": kind.kind(), "apiVersion": kind.api_version(), "metadata": metadata }),
    )
}

/// What a watch with these filters sees of one change, if anything.
fn filter_event(
    event: &Event,
    target: &Target,
    labels: &LabelSelector,
    fields: &FieldSelector,
) -> Option<(&'static str, Value)> {
    if event.kind != target.kind
        || target
            .namespace
            .as_ref()
            .is_some_and(|ns| *ns != event.namespace)
    {
        return None;
    }
    let matches = |o: &Value| labels.matches(o) && fields.matches(o);
    let now_matches = matches(&event.object);
    let ty = match (event.event_type, &event.previous) {
        (EventType::Modified, Some(prev)) => match (matches(prev), now_matches) {
            (true, true) => "MODIFIED",
            (false, true) => "ADDED",
            (true, false) => "DELETED",
            (false, false) => return None,
        },
        (ty, _) if now_matches => ty.as_str(),
        _ => return None,
    };
    Some((ty, event.object.clone()))
}

fn watch(
    shared: &Arc<Shared>,
    target: &Target,
    query: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(target.kind, query)?;
    let flag = |k: &str| matches!(query.get(k).map(String::as_str), Some("true" | "1"));
    let bookmarks = flag("allowWatchBookmarks");
    let initial_events = flag("sendInitialEvents");
    if initial_events && !bookmarks {
        return Err(ApiError::bad_request(
            "sendInitialEvents requires allowWatchBookmarks=true",
        ));
    }
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let requested_rv = match query.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(rv) => Some(rv.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!(
                "resourceVersion: Invalid value: {rv:?}: must be a number"
            ))
        })?),
    };

    let mut first: Vec<Bytes> = Vec::new();
    let (rx, mut last_rv) = {
        let store = shared.lock();
        // Subscribing under the lock means no change falls between the replay and the
        // live feed.
        let rx = store.subscribe();
        match requested_rv {
            Some(rv) if !initial_events => {
                if rv < store.oldest_resumable_rv() {
                    let err = ApiError::expired(rv, store.oldest_resumable_rv());
                    first.push(event_line("ERROR", &err.to_status()));
                    return Ok(stream_response(first, None));
                }
                for event in store.history_after(rv) {
                    if let Some((ty, object)) = filter_event(event, target, &labels, &fields) {
                        first.push(event_line(ty, &object));
                    }
                }
            }
            _ => {
                // No version (or sendInitialEvents): the current state as ADDED events first.
                for object in store.list(target.kind, target.namespace.as_deref()) {
                    if labels.matches(object) && fields.matches(object) {
                        first.push(event_line("ADDED", object));
                    }
                }
                if initial_events {
                    first.push(bookmark(target.kind, store.current_rv(), true));
                }
            }
        }
        (rx, store.current_rv().max(requested_rv.unwrap_or(0)))
    };

    let (tx, out) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    let shared = shared.clone();
    let target = Target {
        kind: target.kind,
        namespace: target.namespace.clone(),
        name: None,
        sub: None,
    };
    tokio::spawn(async move {
        let mut rx = rx;
        let mut shutdown = shared.shutdown.clone();
        for line in first {
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut ticker = tokio::time::interval(shared.bookmark_interval);
        ticker.tick().await;
        loop {
            let expired = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let line = tokio::select! {
                _ = expired => return,
                _ = stopped(&mut shutdown) => return,
                _ = ticker.tick(), if bookmarks => bookmark(target.kind, last_rv, false),
                received = rx.recv() => match received {
                    Ok(event) => {
                        if event.rv <= last_rv {
                            continue;
                        }
                        last_rv = event.rv;
                        match filter_event(&event, &target, &labels, &fields) {
                            Some((ty, object)) => event_line(ty, &object),
                            None => continue,
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // The watcher fell too far behind: tell it to relist, as the
                        // real watch cache does.
                        let oldest = shared.lock().oldest_resumable_rv();
                        let _ = tx.send(Ok(event_line("ERROR", &ApiError::expired(last_rv, oldest).to_status()))).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            if tx.send(Ok(line)).await.is_err() {
                return; // the client went away
            }
        }
    });
    Ok(stream_response(Vec::new(), Some(out)))
}

fn stream_response(
    lines: Vec<Bytes>,
    rest: Option<mpsc::Receiver<Result<Bytes, Infallible>>>,
) -> Response {
    use futures_util::StreamExt;
    let head = futures_util::stream::iter(lines.into_iter().map(Ok::<_, Infallible>));
    let body = match rest {
        Some(rx) => Body::from_stream(head.chain(tokio_stream::wrappers::ReceiverStream::new(rx))),
        None => Body::from_stream(head),
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
