//! The messages admin API: backend send, listing, deletion, retention.

use tern::client::{Event, Outgoing};
use tern::wire::{flags, StatusCode};

use crate::util::{barrier_self, http, msg, next, status, wait_for, TestServer, ADMIN};

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// A backend send reaches a connected user exactly like a SEND, and its
/// receipts go to the `from` user.
#[test]
fn backend_send_is_a_send() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let mut alice = server.connect(&ta);
    let mut bob = server.connect(&tb);
    let post = |body: &str| http(server.http, "POST", "/v1/messages", Some(ADMIN), body);

    let (code, body) =
        post(r#"{"from":"alice","to":"bob","id":7,"payload":"hi bob","type":3,"priority":2}"#);
    assert_eq!(code, 202, "{body}");
    assert_eq!(json(&body), serde_json::json!({"status":"sent","id":7}));
    let m = msg(next(&mut bob, 10));
    assert_eq!(
        (m.from.as_str(), m.id, m.msg_type, m.priority),
        ("alice", 7, 3, 2)
    );
    assert_eq!(m.payload, b"hi bob");
    assert_eq!(m.flags, flags::DELIVERY_RECEIPT | flags::READ_RECEIPT);
    bob.ack(&[m.seq]).unwrap();
    let s = status(next(&mut alice, 10));
    assert_eq!((s.id, s.status), (7, StatusCode::DELIVERED));
    alice.ack(&[s.seq.unwrap()]).unwrap();

    // Duplicate: answered with the current status, not delivered again.
    let (code, body) = post(r#"{"from":"alice","to":"bob","id":7,"payload":"hi bob"}"#);
    assert_eq!(
        (code, json(&body)["status"].as_str()),
        (202, Some("delivered"))
    );
    barrier_self(&mut bob);

    // Binary payloads and errors.
    let (code, _) = post(r#"{"from":"alice","to":"bob","id":8,"payload_b64":"AAEC/w=="}"#);
    assert_eq!(code, 202);
    let m = msg(next(&mut bob, 10));
    assert_eq!(m.payload, [0, 1, 2, 255]);
    let check = |(code, body): (u16, String), want: u16, error: &str| {
        assert_eq!(code, want, "{body}");
        assert_eq!(json(&body)["error"], error, "{body}");
    };
    check(post("{nope"), 400, "bad_request");
    check(
        post(r#"{"from":"alice","to":"bad addr","id":1}"#),
        400,
        "invalid_address",
    );
    check(
        post(r#"{"from":"ghost","to":"bob","id":1}"#),
        404,
        "not_found",
    );
    check(
        post(r#"{"from":"alice","to":"nobody","id":1}"#),
        404,
        "invalid_dest",
    );
    check(
        post(r#"{"from":"alice","to":"bob","id":1,"payload_b64":"!!"}"#),
        400,
        "bad_request",
    );
    check(
        post(r#"{"from":"alice","to":"bob","group":"g","id":1}"#),
        400,
        "bad_request",
    );
    check(
        post(r#"{"from":"alice","to":"bob","id":1,"priority":16}"#),
        400,
        "bad_request",
    );
    check(
        post(r#"{"from":"alice","group":"nope","id":1}"#),
        404,
        "invalid_dest",
    );
    check(
        http(server.http, "POST", "/v1/messages", None, "{}"),
        401,
        "unauthorized",
    );
    check(
        http(server.http, "GET", "/v1/messages", Some(ADMIN), ""),
        405,
        "method_not_allowed",
    );
}

/// Listing queued messages; deleting by id+from and by time stores DELETED
/// for their senders.
#[test]
fn list_and_delete_queued_messages() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let (ta, tc) = (server.user("alice"), server.user("carol"));
    server.user("bob");
    let mut alice = server.connect(&ta);
    let mut carol = server.connect(&tc);
    for i in 1..=3 {
        assert_eq!(
            alice
                .send_wait(&Outgoing::to("bob", b"from alice").id(i))
                .unwrap(),
            StatusCode::SENT
        );
    }
    assert_eq!(
        carol
            .send_wait(&Outgoing::to("bob", &[0xff, 0]).id(1))
            .unwrap(),
        StatusCode::SENT
    );
    let list = |q: &str| {
        json(
            &http(
                server.http,
                "GET",
                &format!("/v1/users/bob/messages{q}"),
                Some(ADMIN),
                "",
            )
            .1,
        )
    };
    let v = list("");
    let msgs = v["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 4);
    assert_eq!(msgs[0]["from"], "alice");
    assert_eq!(msgs[0]["payload"], "from alice");
    assert_eq!(msgs[3]["payload_b64"], "/wA=");
    assert_eq!(msgs[3]["delivered"], false);
    assert_eq!(list("?limit=2")["messages"].as_array().unwrap().len(), 2);
    let far = msgs[0]["time"].as_u64().unwrap() + 3_600_000;
    assert_eq!(
        list(&format!("?since={far}"))["messages"]
            .as_array()
            .unwrap()
            .len(),
        0
    );

    let del = |q: &str| {
        http(
            server.http,
            "DELETE",
            &format!("/v1/users/bob/messages{q}"),
            Some(ADMIN),
            "",
        )
    };
    let (code, body) = del("?id=2&from=alice");
    assert_eq!(
        (code, json(&body)),
        (200, serde_json::json!({"deleted": 1}))
    );
    let s = status(next(&mut alice, 10));
    assert_eq!(
        (s.id, s.status, s.to.as_deref()),
        (2, StatusCode::DELETED, Some("bob"))
    );
    assert!(s.seq.is_some());
    alice.ack(&[s.seq.unwrap()]).unwrap();
    let now = far; // everything queued is older than this
    let (code, body) = del(&format!("?before={now}"));
    assert_eq!(
        (code, json(&body)),
        (200, serde_json::json!({"deleted": 3}))
    );
    let mut alice_deleted: Vec<u64> = (0..2)
        .map(|_| match next(&mut alice, 10) {
            Event::Status(s) if s.status == StatusCode::DELETED => s.id,
            other => panic!("{other:?}"),
        })
        .collect();
    alice_deleted.sort();
    assert_eq!(alice_deleted, [1, 3]);
    let s = status(next(&mut carol, 10));
    assert_eq!((s.id, s.status), (1, StatusCode::DELETED));
    assert_eq!(list("")["messages"].as_array().unwrap().len(), 0);

    assert_eq!(del("").0, 400);
    assert_eq!(del("?before=abc").0, 400);
    assert_eq!(
        http(
            server.http,
            "GET",
            "/v1/users/nobody/messages",
            Some(ADMIN),
            ""
        )
        .0,
        404
    );
}

/// With retain_delivered, delivered messages are listed and can be cleared.
#[test]
fn retention_keeps_delivered_messages() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), &["--retain-delivered", "true"]);
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let mut alice = server.connect(&ta);
    let mut bob = server.connect(&tb);
    assert_eq!(
        alice
            .send_wait(&Outgoing::to("bob", b"keep me").id(1).flags(0))
            .unwrap(),
        StatusCode::SENT
    );
    let m = msg(next(&mut bob, 10));
    bob.ack(&[m.seq]).unwrap();
    // The ACK is durable once a later request on the same queue is: poll
    // the listing until the message shows as delivered.
    let list = || {
        json(
            &http(
                server.http,
                "GET",
                "/v1/users/bob/messages",
                Some(ADMIN),
                "",
            )
            .1,
        )
    };
    let listed = wait_for(
        std::time::Duration::from_secs(10),
        "the message listed as delivered",
        || {
            let v = list();
            let msgs = v["messages"].as_array().unwrap().clone();
            (msgs.len() == 1 && msgs[0]["delivered"] == true).then(|| msgs[0].clone())
        },
    );
    assert_eq!(listed["payload"], "keep me");
    assert_eq!(listed["seq"].as_u64(), Some(m.seq));
    // Listed means written, not yet completed: until the ACK's batch
    // completes, bob's in-flight entry for it stays, and a new connection
    // would write it again, flagged REDELIVERY (seen once in about twenty
    // runs of the suite). A marker sent now goes in a later batch, and
    // completions run in the order batches were built: its SENT comes
    // after the ACK's completion.
    barrier_self(&mut alice);
    // Delivered means not redelivered: a new connection (no SEQ memory)
    // gets nothing before its marker.
    drop(bob);
    let mut bob = server.connect(&tb);
    let mark = barrier_self(&mut bob);
    // The marker is kept too once its ACK is committed. Wait for that: a
    // delete that lands in the ACK's own commit batch misses the message
    // (the history scan reads the store, not the batch; a server bug this
    // test does not pin). Then delete it by id and sender.
    wait_for(
        std::time::Duration::from_secs(10),
        "the marker listed as delivered",
        || {
            let v = list();
            let msgs = v["messages"].as_array().unwrap().clone();
            msgs.iter()
                .any(|m| m["id"].as_u64() == Some(mark.id) && m["delivered"] == true)
                .then_some(())
        },
    );
    let (code, body) = http(
        server.http,
        "DELETE",
        &format!("/v1/users/bob/messages?id={}&from=bob", mark.id),
        Some(ADMIN),
        "",
    );
    assert_eq!((code, json(&body)["deleted"].as_u64()), (200, Some(1)));
    let (code, body) = http(
        server.http,
        "DELETE",
        "/v1/users/bob/messages?id=1&from=alice",
        Some(ADMIN),
        "",
    );
    assert_eq!((code, json(&body)["deleted"].as_u64()), (200, Some(1)));
    assert_eq!(list()["messages"].as_array().unwrap().len(), 0);
    // No DELETED for a delivered message: the delete was committed before
    // its answer, so a status it stored would come before alice's marker.
    barrier_self(&mut alice);
}
