//! Watch streams: events in order from a resource version, selector transitions,
//! bookmarks, expired history, and kube-rs' own watcher on top.

use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{
    DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::watcher;
use serde_json::json;
use streamspace_kube_fake::FakeConfig;

use crate::helpers::{DEADLINE, deployment, start, start_with};

async fn next<S, T>(stream: &mut S) -> T
where
    S: futures_util::Stream<Item = kube::Result<T>> + Unpin,
{
    tokio::time::timeout(DEADLINE, stream.next())
        .await
        .expect("an event before the deadline")
        .expect("stream open")
        .expect("event decodes")
}

/// The next event that is not a bookmark, as `(type, name)`.
async fn next_change<S>(stream: &mut S) -> (&'static str, String)
where
    S: futures_util::Stream<Item = kube::Result<WatchEvent<Deployment>>> + Unpin,
{
    loop {
        let name = |d: &Deployment| d.metadata.name.clone().unwrap_or_default();
        return match next(stream).await {
            WatchEvent::Added(d) => ("ADDED", name(&d)),
            WatchEvent::Modified(d) => ("MODIFIED", name(&d)),
            WatchEvent::Deleted(d) => ("DELETED", name(&d)),
            WatchEvent::Bookmark(_) => continue,
            WatchEvent::Error(e) => panic!("watch error {e:?}"),
        };
    }
}

#[tokio::test]
async fn a_watch_from_a_version_sees_every_later_change_in_order() {
    let t = start().await;
    let api = t.api::<Deployment>();
    let before = api.list(&ListParams::default()).await.unwrap();
    let rv = before.metadata.resource_version.unwrap();
    // Changes made before the watch starts are replayed from the history.
    api.create(&PostParams::default(), &deployment("w1", "img", 0))
        .await
        .unwrap();
    let mut stream = api
        .watch(&WatchParams::default().labels("session=w1"), &rv)
        .await
        .unwrap()
        .boxed();
    api.patch(
        "w1",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"a": "b"}}})),
    )
    .await
    .unwrap();
    api.delete("w1", &DeleteParams::default()).await.unwrap();

    // The controller's status updates interleave as MODIFIED events, as on a cluster;
    // what matters is the order and that every version is newer than the last.
    let mut seen = Vec::new();
    let mut last_rv = rv.parse::<u64>().unwrap();
    loop {
        let (ty, d) = match next(&mut stream).await {
            WatchEvent::Added(d) => ("ADDED", d),
            WatchEvent::Modified(d) => ("MODIFIED", d),
            WatchEvent::Deleted(d) => ("DELETED", d),
            WatchEvent::Bookmark(_) => continue,
            WatchEvent::Error(e) => panic!("watch error {e:?}"),
        };
        let event_rv = d
            .metadata
            .resource_version
            .as_deref()
            .unwrap()
            .parse::<u64>()
            .unwrap();
        assert!(event_rv > last_rv, "{event_rv} after {last_rv}");
        last_rv = event_rv;
        let annotated = d.metadata.annotations.is_some_and(|a| a.contains_key("a"));
        seen.push((ty, annotated));
        if ty == "DELETED" {
            break;
        }
    }
    assert_eq!(seen.first(), Some(&("ADDED", false)), "{seen:?}");
    assert_eq!(seen.last(), Some(&("DELETED", true)), "{seen:?}");
    assert!(seen.contains(&("MODIFIED", true)), "{seen:?}");
}

#[tokio::test]
async fn leaving_a_label_selector_is_a_deleted_event() {
    let t = start().await;
    let api = t.api::<Deployment>();
    let created = api
        .create(&PostParams::default(), &deployment("w2", "img", 0))
        .await
        .unwrap();
    let rv = created.metadata.resource_version.unwrap();
    let mut stream = api
        .watch(&WatchParams::default().labels("tier=gold"), &rv)
        .await
        .unwrap()
        .boxed();
    let label = |v: Option<&str>| Patch::Merge(json!({"metadata": {"labels": {"tier": v}}}));
    api.patch("w2", &PatchParams::default(), &label(Some("gold")))
        .await
        .unwrap();
    assert_eq!(next_change(&mut stream).await, ("ADDED", "w2".into()));
    api.patch("w2", &PatchParams::default(), &label(None))
        .await
        .unwrap();
    assert_eq!(next_change(&mut stream).await, ("DELETED", "w2".into()));
}

#[tokio::test]
async fn bookmarks_arrive_when_allowed() {
    let t = start_with(FakeConfig {
        bookmark_interval: Duration::from_millis(10),
        ..FakeConfig::default()
    })
    .await;
    let api = t.api::<Deployment>();
    let rv = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut stream = api
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match next(&mut stream).await {
        WatchEvent::Bookmark(b) => assert_eq!(b.metadata.resource_version, rv),
        other => panic!("expected a bookmark, got {other:?}"),
    }
}

#[tokio::test]
async fn resuming_from_a_version_older_than_the_history_is_410_expired() {
    let t = start_with(FakeConfig {
        history_limit: 2,
        ..FakeConfig::default()
    })
    .await;
    let api = t.api::<Deployment>();
    let rv = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    for name in ["x1", "x2", "x3"] {
        api.create(&PostParams::default(), &deployment(name, "img", 0))
            .await
            .unwrap();
    }
    let mut stream = api
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match next(&mut stream).await {
        WatchEvent::Error(status) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
        }
        other => panic!("expected 410, got {other:?}"),
    }
}

#[tokio::test]
async fn kube_runtime_watcher_lists_then_follows() {
    let t = start().await;
    let api = t.api::<Deployment>();
    api.create(&PostParams::default(), &deployment("r1", "img", 0))
        .await
        .unwrap();
    let mut events = watcher(
        api.clone(),
        watcher::Config::default().labels("app=streamspace-session"),
    )
    .boxed();
    // The initial list arrives as Init .. InitApply .. InitDone.
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(DEADLINE, events.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            watcher::Event::InitApply(d) => seen.push(d.metadata.name.unwrap()),
            watcher::Event::InitDone => break,
            _ => {}
        }
    }
    assert_eq!(seen, ["r1"]);
    api.create(&PostParams::default(), &deployment("r2", "img", 0))
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(DEADLINE, events.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            watcher::Event::Apply(d) if d.metadata.name.as_deref() == Some("r2") => break,
            _ => {}
        }
    }
}

#[tokio::test]
async fn streaming_list_sends_initial_events_then_the_end_bookmark() {
    let t = start().await;
    let api = t.api::<Deployment>();
    api.create(&PostParams::default(), &deployment("s1", "img", 0))
        .await
        .unwrap();
    let mut events = watcher(api.clone(), watcher::Config::default().streaming_lists()).boxed();
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(DEADLINE, events.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            watcher::Event::InitApply(d) => seen.push(d.metadata.name.unwrap()),
            watcher::Event::InitDone => break,
            _ => {}
        }
    }
    assert_eq!(seen, ["s1"]);
}

#[tokio::test]
async fn a_label_selected_service_watch_sees_an_out_of_band_delete() {
    use k8s_openapi::api::core::v1::Service;
    use streamspace_kube_fake::{Propagation, ResourceKind};

    let t = start().await;
    let deployments = t.api::<Deployment>();
    let owner = deployments
        .create(&PostParams::default(), &deployment("sv1", "img", 0))
        .await
        .unwrap();
    let services = t.api::<Service>();
    for name in ["sv1", "other"] {
        let mut svc = crate::helpers::service(name, &owner);
        svc.metadata.owner_references = None;
        services.create(&PostParams::default(), &svc).await.unwrap();
    }
    let mut events = watcher(
        services.clone(),
        watcher::Config::default().labels("app=streamspace-session,session=sv1"),
    )
    .boxed();
    let mut listed = Vec::new();
    loop {
        match tokio::time::timeout(DEADLINE, events.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            watcher::Event::InitApply(s) => listed.push(s.metadata.name.unwrap()),
            watcher::Event::InitDone => break,
            _ => {}
        }
    }
    assert_eq!(listed, ["sv1"], "the selector leaves the other Service out");

    assert!(t.fake.delete_out_of_band(
        ResourceKind::Service,
        crate::helpers::NS,
        "other",
        Propagation::Background
    ));
    assert!(t.fake.delete_out_of_band(
        ResourceKind::Service,
        crate::helpers::NS,
        "sv1",
        Propagation::Background
    ));
    let deleted = loop {
        match tokio::time::timeout(DEADLINE, events.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            watcher::Event::Delete(s) => break s.metadata.name.unwrap(),
            watcher::Event::Apply(s) => panic!("unexpected change {s:?}"),
            _ => {}
        }
    };
    assert_eq!(
        deleted, "sv1",
        "only the selected Service's deletion is seen"
    );
}
