//! Loom models of the per-IP table and its reserves. Run with
//! `RUSTFLAGS="--cfg loom" cargo test --release --lib loom`. Under loom two threads of three
//! share a lane, so some executions take a reserved place from a shared lane.
use super::*;
use loom::sync::atomic::{
    AtomicBool, AtomicUsize,
    Ordering::{Acquire, Relaxed, Release},
};
use loom::sync::Arc;
use loom::thread;

/// Every place was released: no key is live, and after the reserves give theirs back,
/// every slot is empty.
fn all_empty(t: &IpTable) -> bool {
    assert_eq!(t.live_keys(), 0);
    t.give_back_reserves();
    t.used_slots() == 0
}

#[test]
fn loom_concurrent_first_connections_share_one_slot() {
    loom::model(|| {
        let t = Arc::new(IpTable::with_min_slots(1));
        let t2 = t.clone();
        let h = thread::spawn(move || t2.acquire(42, 10).unwrap());
        let a = t.acquire(42, 10).unwrap();
        let b = h.join().unwrap();
        assert_eq!(a.slot, b.slot, "one key, one slot");
        assert_eq!(t.places_at(a.slot), 2);
        t.release(a);
        t.release(b);
        assert!(all_empty(&t));
    });
}

#[test]
fn loom_limit_is_never_exceeded_by_racing_first_connections() {
    loom::model(|| {
        let t = Arc::new(IpTable::with_min_slots(1));
        let t2 = t.clone();
        let h = thread::spawn(move || t2.acquire(5, 1));
        let a = t.acquire(5, 1);
        let b = h.join().unwrap();
        assert!(
            a.is_ok() ^ b.is_ok(),
            "exactly one of two gets the only place"
        );
        let place = a.or(b).unwrap();
        assert_eq!(t.places_at(place.slot), 1);
        t.release(place);
        assert!(all_empty(&t));
    });
}

#[test]
fn loom_release_racing_a_claim() {
    loom::model(|| {
        let t = Arc::new(IpTable::with_min_slots(1));
        let first = t.acquire(9, 10).unwrap();
        let t2 = t.clone();
        let h = thread::spawn(move || t2.release(first));
        let second = t.acquire(9, 10).unwrap();
        h.join().unwrap();
        assert_eq!(t.live_keys(), 1);
        assert_eq!(t.connections_at(second.slot), 1);
        t.release(second);
        assert!(all_empty(&t));
    });
}

#[test]
fn loom_slot_reuse_after_zero() {
    loom::model(|| {
        // A full table: the only way in for a new key is the slot another key frees.
        let t = Arc::new(IpTable::with_min_slots(1));
        let held: Vec<Place> = (10..10 + WINDOW as u128)
            .map(|k| t.acquire(k, 10).unwrap())
            .collect();
        let freed = held[0];
        let t2 = t.clone();
        let h = thread::spawn(move || t2.release(freed));
        let got = t.acquire(99, 10);
        h.join().unwrap();
        match got {
            Ok(place) => assert_eq!(place.slot, freed.slot, "the new key took the freed slot"),
            Err(e) => assert_eq!(
                e,
                TableReject::Full,
                "before the release the table was full"
            ),
        }
        for place in got.into_iter().chain(held.into_iter().skip(1)) {
            t.release(place);
        }
        assert!(all_empty(&t));
    });
}

/// Makes the next thread to ask for a lane share this thread's (two lanes under loom): this
/// thread has lane 0, and a thread in between takes lane 1.
fn let_the_next_thread_share_this_lane() {
    assert_eq!(super::super::lane::index(), 0);
    thread::spawn(|| super::super::lane::index())
        .join()
        .unwrap();
}

/// A table where address 1 holds two connections, the second of them shared (its place
/// goes to a reserve when it closes).
fn two_connections_of_one_address(limit: u64) -> (Arc<IpTable>, Place, Place) {
    let t = Arc::new(IpTable::with_min_slots(1));
    let first = t.acquire(1, limit).unwrap();
    let second = t.acquire(1, limit).unwrap();
    assert!(second.shared);
    (t, first, second)
}

/// On another thread, address 1 connects at once and, if refused, once more after `done` is
/// set: a place freed before that must then be found.
fn connect_now_and_after(
    t: &Arc<IpTable>,
    done: &Arc<AtomicBool>,
    limit: u64,
) -> thread::JoinHandle<Result<Place, TableReject>> {
    let (t, done) = (t.clone(), done.clone());
    thread::spawn(move || {
        let early = t.acquire(1, limit);
        while !done.load(Acquire) {
            thread::yield_now();
        }
        early.or_else(|_| t.acquire(1, limit))
    })
}

#[test]
fn loom_a_close_into_a_reserve_racing_a_connection_of_the_address_on_another_thread() {
    loom::model(|| {
        let (t, first, second) = two_connections_of_one_address(2);
        // Before the close the address is at its limit; after it the place is free, in the
        // closer's reserve.
        let closed = Arc::new(AtomicBool::new(false));
        let taker = connect_now_and_after(&t, &closed, 2);
        t.release(second);
        closed.store(true, Release);
        let got = taker
            .join()
            .unwrap()
            .expect("the freed place reaches the other thread");
        assert_eq!(got.slot, first.slot);
        assert_eq!((t.places_at(got.slot), t.connections_at(got.slot)), (2, 2));
        assert_eq!(t.acquire(1, 2), Err(TableReject::LimitReached));
        t.release(got);
        t.release(first);
        assert!(all_empty(&t));
    });
}

#[test]
fn loom_two_takers_of_a_reserved_place_get_it_once() {
    loom::model(|| {
        let (t, first, second) = two_connections_of_one_address(2);
        t.release(second); // the free place is now in this thread's reserve
        let (t2, t3) = (t.clone(), t.clone());
        let a = thread::spawn(move || t2.acquire(1, 2));
        let b = thread::spawn(move || t3.acquire(1, 2));
        let (a, b) = (a.join().unwrap(), b.join().unwrap());
        assert!(
            a.is_ok() ^ b.is_ok(),
            "exactly one of two gets the only place"
        );
        assert_eq!(t.connections_at(first.slot), 2);
        t.release(a.or(b).unwrap());
        t.release(first);
        assert!(all_empty(&t));
    });
}

#[test]
fn loom_a_lowered_limit_holds_while_a_close_fills_a_reserve() {
    loom::model(|| {
        // A reload lowers the address's limit from 2 to 1 while one of its two connections
        // closes into this thread's reserve: one connection is left, at the new limit, so
        // the other thread is refused whether it comes before, during or after the close.
        // The late thread shares this thread's lane (two lanes under loom: another thread
        // takes the second first), so the closed place is in its own reserve.
        let (t, first, second) = two_connections_of_one_address(2);
        let_the_next_thread_share_this_lane();
        let t2 = t.clone();
        let late = thread::spawn(move || {
            assert_eq!(super::super::lane::index(), 0);
            t2.acquire(1, 1)
        });
        t.release(second);
        assert_eq!(late.join().unwrap(), Err(TableReject::LimitReached));
        assert_eq!(t.connections_at(first.slot), 1);
        t.release(first);
        assert!(all_empty(&t));
    });
}

#[test]
fn loom_churn_of_one_address_on_two_threads_never_passes_the_limit() {
    loom::model(|| {
        let (t, first, second) = two_connections_of_one_address(2);
        t.release(second);
        let held = Arc::new(AtomicUsize::new(0));
        let churn = |t: Arc<IpTable>, held: Arc<AtomicUsize>| {
            move || {
                for _ in 0..2 {
                    if let Ok(place) = t.acquire(1, 2) {
                        assert_eq!(held.fetch_add(1, Relaxed), 0, "three connections at once");
                        held.fetch_sub(1, Relaxed);
                        t.release(place);
                    }
                }
            }
        };
        let other = thread::spawn(churn(t.clone(), held.clone()));
        churn(t.clone(), held)();
        other.join().unwrap();
        assert_eq!((t.live_keys(), t.connections_at(first.slot)), (1, 1));
        t.release(first);
        assert!(all_empty(&t));
    });
}

#[test]
fn loom_a_thread_giving_its_reserve_back_races_a_connection_of_the_address() {
    loom::model(|| {
        // The address's connections have all closed, the last into this thread's reserve;
        // this thread's sweeper gives the place back while the address connects again on
        // another thread, at a limit of 1. The place is never counted twice nor lost: a try
        // that races the give-back may miss it in transit (out of the reserve, not yet off the
        // count), as one racing a close misses the place that close frees; once the give-back
        // is done, it is free in the slot, or the slot is free.
        let (t, first, second) = two_connections_of_one_address(2);
        t.release(first);
        t.release(second);
        assert_eq!((t.places_at(first.slot), t.live_keys()), (1, 0));
        let done = Arc::new(AtomicBool::new(false));
        let again = connect_now_and_after(&t, &done, 1);
        t.give_back_own_reserve();
        done.store(true, Release);
        let got = again
            .join()
            .unwrap()
            .expect("the place is free once given back");
        assert_eq!((t.places_at(got.slot), t.connections_at(got.slot)), (1, 1));
        assert_eq!(t.acquire(1, 1), Err(TableReject::LimitReached));
        t.release(got);
        assert!(all_empty(&t));
    });
}

/// Two addresses of one home line, so that both claim the same first free slot.
fn two_addresses_of_one_home(t: &IpTable) -> (u128, u128) {
    let home = |k| t.locate(k).0;
    let other = (2..).find(|&k| home(k) == home(1)).unwrap();
    (1, other)
}

#[test]
fn loom_a_place_taken_from_a_shared_lane_for_a_slot_that_changed_hands_goes_back() {
    // Four threads: the search is bounded to four preemptions (the race needs one; 3 s),
    // where the whole of it took 9 minutes. It fails with the look after the take removed.
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(4);
    model.check(|| {
        // Threads beyond the lanes share them (two lanes under loom). This thread finds its
        // address (b) live in a slot, where another thread holds b's only connection; before
        // it takes a place from its lane's entry for that slot, the connection may close, the
        // slot go to address a, and a thread sharing the lane leave one of a's places in the
        // entry. A place so taken is a's: the look at the slot's key after the take gives it
        // back, and b is counted in a slot of its own.
        let t = Arc::new(IpTable::with_min_slots(1));
        let (a, b) = two_addresses_of_one_home(&t);
        let_the_next_thread_share_this_lane();
        let held = t.acquire(b, 10).unwrap();
        let closer = {
            let t = t.clone();
            thread::spawn(move || t.release(held))
        };
        let sharer = {
            let t = t.clone();
            thread::spawn(move || {
                let first = t.acquire(a, 10).unwrap();
                let second = t.acquire(a, 10).unwrap();
                assert_eq!(super::super::lane::index(), 0);
                t.release(second);
                first
            })
        };
        let mine = t.acquire(b, 10).unwrap();
        closer.join().unwrap();
        let theirs = sharer.join().unwrap();
        let fp = |k| t.locate(k).1 >> FP_SHIFT;
        assert_eq!(
            t.fingerprint(mine.slot),
            fp(b),
            "b is counted in a slot of b"
        );
        assert_eq!(t.fingerprint(theirs.slot), fp(a));
        assert_eq!(t.connections_at(mine.slot), 1);
        assert_eq!(t.connections_at(theirs.slot), 1);
        t.release(mine);
        t.release(theirs);
        assert!(all_empty(&t));
    });
}
