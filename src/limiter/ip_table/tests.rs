//! Unit tests of the per-IP table and its reserves.

use super::*;
use std::sync::Arc;

fn all_empty(t: &IpTable) -> bool {
    t.used_slots() == 0
}

/// Opens `n` connections of `key`, then closes them all: the key's slot.
fn open_and_close(t: &IpTable, key: u128, n: usize) -> usize {
    let held: Vec<Place> = (0..n).map(|_| t.acquire(key, 10).unwrap()).collect();
    let a = held[0].slot;
    for place in held {
        t.release(place);
    }
    a
}

/// The slot of an acquire's place.
fn slot(got: Result<Place, TableReject>) -> Result<usize, TableReject> {
    got.map(|place| place.slot)
}

#[test]
fn same_key_shares_one_slot_and_empties() {
    let t = IpTable::with_min_slots(64);
    let held: Vec<Place> = (0..3).map(|_| t.acquire(7, 3).unwrap()).collect();
    let a = held[0].slot;
    assert!(held.iter().all(|p| p.slot == a));
    assert_eq!(
        held.iter().map(|p| p.shared).collect::<Vec<_>>(),
        [false, true, true],
        "the first had no other place"
    );
    assert_eq!(t.acquire(7, 3), Err(TableReject::LimitReached));
    assert_eq!(t.places_at(a), 3);
    assert_eq!(t.live_keys(), 1);
    for place in held {
        t.release(place);
    }
    assert_eq!(t.live_keys(), 0);
    assert_eq!(t.connections_at(a), 0);
    assert_eq!(t.places_at(a), 2, "the two shared ones in the reserve");
    t.give_back_reserves();
    assert!(all_empty(&t));
}

#[test]
fn a_closed_connections_place_waits_for_the_address_in_its_threads_reserve() {
    let t = Arc::new(IpTable::with_min_slots(64));
    let first = t.acquire(7, 2).unwrap();
    let second = t.acquire(7, 2).unwrap();
    let a = second.slot;
    t.release(second);
    assert_eq!((t.live_keys(), t.connections_at(a)), (1, 1));
    assert_eq!(t.places_at(a), 2, "the place stays counted, in the reserve");
    let again = t.acquire(7, 2).unwrap();
    assert_eq!(again.slot, a, "and the next connection takes it");
    assert_eq!((t.places_at(a), t.connections_at(a)), (2, 2));
    assert_eq!(t.acquire(7, 2), Err(TableReject::LimitReached));
    t.release(again);
    // Another thread finds the address at its limit, and the place in this one's reserve.
    let other = t.clone();
    let b = std::thread::spawn(move || other.acquire(7, 2))
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(b.slot, a);
    assert_eq!((t.places_at(a), t.connections_at(a)), (2, 2));
    assert_eq!(t.acquire(7, 2), Err(TableReject::LimitReached));
    // Its last two connections close: the one that came with another goes to the reserve.
    t.release(b);
    t.release(first);
    assert_eq!(
        (t.live_keys(), t.connections_at(a), t.places_at(a)),
        (0, 0, 1)
    );
    t.give_back_reserves();
    assert!(all_empty(&t));
}

#[test]
fn an_address_of_one_connection_at_a_time_holds_no_reserve() {
    let t = IpTable::with_min_slots(64);
    for _ in 0..3 {
        let place = t.acquire(7, 5).unwrap();
        assert!(!place.shared);
        t.release(place);
        assert!(all_empty(&t));
    }
}

#[test]
fn a_reserve_keeps_a_few_places_of_an_address() {
    let t = IpTable::with_min_slots(64);
    let a = open_and_close(&t, 7, 10);
    assert_eq!(t.places_at(a), super::super::ip_reserve::PER_ADDRESS);
    assert_eq!(t.live_keys(), 0);
}

#[test]
fn a_thread_gives_its_reserved_places_back_and_the_table_is_empty_again() {
    // What each worker's sweeper does every tick: after churn, no slot is kept by reserves.
    let t = Arc::new(IpTable::with_min_slots(64));
    let a = open_and_close(&t, 7, 3);
    // Another thread churns its own address, then gives its reserve back when told.
    let (churned, go) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
    let other = t.clone();
    let worker = std::thread::spawn(move || {
        churned.0.send(open_and_close(&other, 8, 3)).unwrap();
        go.1.recv().unwrap();
        other.give_back_own_reserve();
    });
    let b = churned.1.recv().unwrap();
    assert_eq!((t.places_at(a), t.places_at(b), t.live_keys()), (2, 2, 0));
    assert_eq!(t.used_slots(), 2, "both slots are kept by the reserves");
    t.give_back_own_reserve();
    assert_eq!(
        (t.places_at(a), t.places_at(b)),
        (0, 2),
        "this thread's places are back, the other thread's reserve is its own"
    );
    assert_eq!(t.fingerprint(a), 0, "slot a is free for any key again");
    assert_eq!(t.used_slots(), 1);
    go.0.send(()).unwrap();
    worker.join().unwrap();
    assert!(all_empty(&t));
}

#[test]
fn a_lower_limit_holds_whatever_the_reserves_keep() {
    // A reload lowers the limit from 3 to 1 while two places sit in the reserve.
    let t = IpTable::with_min_slots(64);
    let held: Vec<Place> = (0..3).map(|_| t.acquire(7, 3).unwrap()).collect();
    let a = held[0].slot;
    for place in held.into_iter().rev() {
        t.release(place);
    }
    assert_eq!((t.places_at(a), t.connections_at(a)), (2, 0));
    let one = t.acquire(7, 1).unwrap();
    assert_eq!(t.acquire(7, 1), Err(TableReject::LimitReached));
    assert_eq!((t.places_at(one.slot), t.connections_at(one.slot)), (1, 1));
}

#[test]
fn a_reserve_entry_gives_an_address_that_stopped_coming_back_to_its_slot() {
    let t = IpTable::with_min_slots(64);
    let _first = t.acquire(1, 10).unwrap();
    let first = t.acquire(1, 10).unwrap();
    // Another address whose slot shares the reserve's entry with the first's.
    let (key, second) = (2..10_000u128)
        .find_map(|k| {
            let place = t.acquire(k, 10).unwrap();
            if place.slot % 8 == first.slot % 8 && place.slot != first.slot {
                return Some((k, t.acquire(k, 10).unwrap()));
            }
            t.release(place);
            None
        })
        .unwrap();
    let (a, b) = (first.slot, second.slot);
    t.release(first);
    assert_eq!((t.places_at(a), t.connections_at(a)), (2, 1));
    t.release(second);
    assert_eq!(
        (t.places_at(a), t.connections_at(a)),
        (1, 1),
        "displaced, back to its slot"
    );
    assert_eq!((t.places_at(b), t.connections_at(b)), (2, 1));
    assert_eq!(slot(t.acquire(key, 10)), Ok(b));
    assert_eq!((t.places_at(b), t.connections_at(b)), (2, 2));
}

#[test]
fn distinct_keys_fill_the_window_then_full() {
    // A 2-line table: every key's window is the whole table.
    let t = IpTable::with_min_slots(1);
    assert_eq!(t.capacity(), WINDOW);
    let held: Vec<Place> = (0..WINDOW as u128)
        .map(|k| t.acquire(k, 1).unwrap())
        .collect();
    assert_eq!(t.live_keys(), WINDOW);
    assert_eq!(t.acquire(1000, 1), Err(TableReject::Full));
    t.release(held[3]);
    assert_eq!(
        slot(t.acquire(1000, 1)),
        Ok(held[3].slot),
        "a freed slot is reused by another key"
    );
}

#[test]
fn a_slot_live_only_for_reserved_places_is_taken_back_for_a_new_key() {
    let t = IpTable::with_min_slots(1);
    let (first, second) = (t.acquire(0, 2).unwrap(), t.acquire(0, 2).unwrap());
    for k in 1..WINDOW as u128 {
        t.acquire(k, 1).unwrap();
    }
    t.release(second);
    t.release(first);
    let a = first.slot;
    assert_eq!((t.live_keys(), t.places_at(a)), (WINDOW - 1, 1));
    assert_eq!(
        slot(t.acquire(1000, 1)),
        Ok(a),
        "the reserved place went back"
    );
    assert_eq!((t.live_keys(), t.places_at(a)), (WINDOW, 1));
}

#[test]
fn racing_first_connections_of_many_threads_share_one_slot() {
    // Loom proves the two-thread interleavings; this runs four real threads through the
    // claim race many times (three or more threads blow up loom's state space).
    let t = Arc::new(IpTable::with_min_slots(64));
    let barrier = Arc::new(std::sync::Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (t, barrier) = (t.clone(), barrier.clone());
            std::thread::spawn(move || {
                (0..2_000u128)
                    .map(|round| {
                        barrier.wait();
                        let place = t.acquire(round, 100).unwrap();
                        barrier.wait();
                        t.release(place);
                        place.slot
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let slots: Vec<Vec<usize>> = threads.into_iter().map(|h| h.join().unwrap()).collect();
    for round in 0..2_000 {
        assert!(
            slots.iter().all(|s| s[round] == slots[0][round]),
            "round {round}: two slots"
        );
    }
    assert_eq!(t.live_keys(), 0);
    t.give_back_reserves();
    assert!(all_empty(&t));
}

#[test]
fn threads_churn_to_empty_and_never_exceed_limit() {
    let t = Arc::new(IpTable::with_min_slots(256));
    let over = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let threads: Vec<_> = (0..4)
        .map(|n| {
            let t = t.clone();
            let over = over.clone();
            std::thread::spawn(move || {
                let mut held = Vec::new();
                for i in 0..50_000u128 {
                    let key = (i * 7 + n) % 13;
                    if let Ok(place) = t.acquire(key, 5) {
                        // Connections and reserved places together, within the limit.
                        if t.places_at(place.slot) > 5 {
                            over.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        held.push(place);
                    }
                    if held.len() > 3 || i % 3 == 0 {
                        if let Some(place) = held.pop() {
                            t.release(place);
                        }
                    }
                }
                for place in held {
                    t.release(place);
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    assert!(!over.load(std::sync::atomic::Ordering::Relaxed));
    assert_eq!(t.live_keys(), 0);
    t.give_back_reserves();
    assert!(all_empty(&t));
}
