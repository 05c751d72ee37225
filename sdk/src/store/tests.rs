//! The store on real SQLite files in a temporary directory: exactly-once
//! inserts, forward-only statuses, group member statuses, unread counts,
//! owed READ receipts, migrations.

use super::*;
use tern::client::{Event as W, Message as WM, StatusEvent};
use tern::wire::StatusCode;

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("s.db")).unwrap();
    (dir, store)
}

fn msg(seq: u64, from: &str, group: Option<&str>, id: u64, body: &str) -> W {
    W::Msg(WM {
        seq,
        from: from.into(),
        group: group.map(str::to_owned),
        id,
        time: 1000 + seq,
        msg_type: 0,
        priority: 0,
        flags: flags::SEND_DEFAULT,
        payload: body.as_bytes().to_vec(),
    })
}

fn status(seq: Option<u64>, id: u64, member: Option<&str>, code: StatusCode) -> W {
    W::Status(StatusEvent {
        seq,
        id,
        to: Some("bob".into()),
        group: None,
        member: member.map(str::to_owned),
        status: code,
        time: 5,
    })
}

#[test]
fn a_redelivery_is_stored_once_and_acked_again() {
    let (_d, s) = open();
    let a = s
        .apply(
            vec![msg(7, "bob", None, 42, "hi"), msg(8, "bob", None, 43, "yo")],
            &[],
        )
        .unwrap();
    assert_eq!(a.acks, [7, 8]);
    assert_eq!(a.events.len(), 2);
    // Same SEQ again (REDELIVERY), and the same (sender, id) under a new SEQ.
    let b = s
        .apply(
            vec![msg(7, "bob", None, 42, "hi"), msg(9, "bob", None, 43, "yo")],
            &[],
        )
        .unwrap();
    assert_eq!(b.acks, [7, 9]);
    assert!(b.events.is_empty(), "{:?}", b.events);
    let bob = Peer::user("bob");
    assert_eq!(s.all_messages(&bob).unwrap().len(), 2);
    assert_eq!(s.unread(&bob).unwrap(), 2);
}

#[test]
fn ephemeral_types_are_acked_not_stored() {
    let (_d, s) = open();
    let W::Msg(mut m) = msg(1, "bob", None, 0, "typing") else {
        unreachable!()
    };
    m.msg_type = 99;
    let a = s.apply(vec![W::Msg(m)], &[99]).unwrap();
    assert_eq!(a.acks, [1]);
    assert!(matches!(&a.events[..], [Event::Live(m)] if m.payload == b"typing"));
    assert_eq!(s.count(Direction::Incoming, None).unwrap(), 0);
}

/// Events come in the order of the frames of a batch, live ones among the
/// stored ones. (Live ones came last: an app, or a test, waiting for a
/// typing indicator and then for the message after it, dropped the
/// message's event on the way.)
#[test]
fn a_batchs_events_keep_the_frames_order() {
    let (_d, s) = open();
    let W::Msg(mut typing) = msg(1, "bob", None, 0, "typing") else {
        unreachable!()
    };
    typing.msg_type = 99;
    let a = s
        .apply(vec![W::Msg(typing), msg(2, "bob", None, 5, "hi")], &[99])
        .unwrap();
    assert!(
        matches!(&a.events[..], [Event::Live(t), Event::Received(m)]
            if t.payload == b"typing" && m.payload == b"hi"),
        "{:?}",
        a.events
    );
}

#[test]
fn statuses_only_move_forward() {
    let (_d, s) = open();
    let m = s
        .queue(&Draft::text(Peer::user("bob"), "x"), Status::Outbox, None)
        .unwrap();
    assert_eq!(m.status, Status::Outbox);
    assert_eq!(s.outbox_after(0, 10).unwrap().len(), 1);
    let steps = [
        (None, StatusCode::OVERLOADED, Status::Outbox, false),
        (None, StatusCode::SENT, Status::Sent, true),
        (Some(1), StatusCode::DELIVERED, Status::Delivered, true),
        (None, StatusCode::SENT, Status::Delivered, false), // a late duplicate answer
        (Some(2), StatusCode::READ, Status::Read, true),
        (Some(2), StatusCode::READ, Status::Read, false), // redelivered
        (Some(3), StatusCode::DELIVERED, Status::Read, false),
    ];
    for (seq, code, want, event) in steps {
        let a = s.apply(vec![status(seq, m.id, None, code)], &[]).unwrap();
        assert_eq!(s.outgoing(m.id).unwrap().unwrap().status, want, "{code:?}");
        assert_eq!(!a.events.is_empty(), event, "{code:?}: {:?}", a.events);
        assert_eq!(a.acks, seq.into_iter().collect::<Vec<_>>());
    }
    assert!(s.outbox_after(0, 10).unwrap().is_empty());
}

#[test]
fn an_answer_for_an_unknown_id_is_a_live_status() {
    let (_d, s) = open();
    let a = s
        .apply(vec![status(None, 77, None, StatusCode::OFFLINE)], &[])
        .unwrap();
    assert!(matches!(
        &a.events[..],
        [Event::LiveStatus { id: 77, status }] if *status == StatusCode::OFFLINE
    ));
}

#[test]
fn group_statuses_per_member() {
    let (_d, s) = open();
    let m = s
        .queue(&Draft::text(Peer::group("team"), "x"), Status::Outbox, None)
        .unwrap();
    let steps = vec![
        status(None, m.id, None, StatusCode::SENT),
        status(Some(1), m.id, Some("ann"), StatusCode::DELIVERED),
        status(Some(2), m.id, Some("ben"), StatusCode::EXPIRED),
        status(Some(3), m.id, Some("ann"), StatusCode::READ),
        status(Some(4), m.id, Some("ann"), StatusCode::DELIVERED),
    ];
    let a = s.apply(steps, &[]).unwrap();
    assert_eq!(a.acks, [1, 2, 3, 4]);
    assert_eq!(a.events.len(), 4, "{:?}", a.events);
    let members = s.member_statuses(m.lid).unwrap();
    let got: Vec<_> = members
        .iter()
        .map(|ms| (ms.member.as_str(), ms.status))
        .collect();
    assert_eq!(
        got,
        [
            ("ann", Status::Read),
            ("ben", Status::Failed(StatusCode::EXPIRED))
        ]
    );
    assert_eq!(s.outgoing(m.id).unwrap().unwrap().status, Status::Read);
}

#[test]
fn mark_read_owes_receipts_and_zeroes_unread() {
    let (_d, s) = open();
    let W::Msg(mut no_receipt) = msg(3, "ann", Some("team"), 12, "c") else {
        unreachable!()
    };
    no_receipt.flags = 0;
    s.apply(
        vec![
            msg(1, "ann", Some("team"), 10, "a"),
            msg(2, "ben", Some("team"), 11, "b"),
            W::Msg(no_receipt),
            msg(4, "ann", None, 13, "1:1"),
        ],
        &[],
    )
    .unwrap();
    let team = Peer::group("team");
    assert_eq!(s.unread(&team).unwrap(), 3);
    assert_eq!(s.unread(&Peer::user("ann")).unwrap(), 1);
    let convs = s.conversations().unwrap();
    assert_eq!(convs.len(), 2);
    assert_eq!(convs[0].peer, Peer::user("ann"), "most recent first");
    assert_eq!(s.mark_read(&team).unwrap(), 3);
    assert_eq!(s.unread(&team).unwrap(), 0);
    let owed = s.owed_reads(10).unwrap();
    let got: Vec<_> = owed
        .iter()
        .map(|o| (o.from.as_str(), o.id, o.group.as_deref()))
        .collect();
    assert_eq!(got, [("ann", 10, Some("team")), ("ben", 11, Some("team"))]);
    s.clear_reads(&owed.iter().map(|o| o.lid).collect::<Vec<_>>())
        .unwrap();
    assert!(s.owed_reads(10).unwrap().is_empty());
    assert_eq!(s.mark_read(&team).unwrap(), 0);
}

#[test]
fn paging_newest_first() {
    let (_d, s) = open();
    let bob = Peer::user("bob");
    for i in 0..25 {
        s.queue(
            &Draft::text(bob.clone(), &i.to_string()),
            Status::Outbox,
            None,
        )
        .unwrap();
    }
    let mut page = Page::latest(10);
    let mut seen = Vec::new();
    loop {
        let got = s.messages(&bob, page).unwrap();
        if got.is_empty() {
            break;
        }
        seen.extend(got.iter().map(|m| m.text().unwrap().to_owned()));
        page = page.next_after(&got).unwrap();
    }
    let want: Vec<String> = (0..25).rev().map(|i| i.to_string()).collect();
    assert_eq!(seen, want);
}

#[test]
fn reopening_keeps_data_and_a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let id = {
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), schema::version());
        s.queue(&Draft::text(Peer::user("bob"), "x"), Status::Outbox, None)
            .unwrap()
            .id
    };
    let s = Store::open(&path).unwrap();
    assert!(s.outgoing(id).unwrap().is_some());
    s.lock()
        .pragma_update(None, "user_version", schema::version() + 1)
        .unwrap();
    drop(s);
    assert!(matches!(
        Store::open(&path),
        Err(Error::SchemaTooNew { .. })
    ));
}
