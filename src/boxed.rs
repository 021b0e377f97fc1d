//! Boxes in blocks this core reuses: [`pin`] is `Box::pin`, and [`new`] `Box::new`, without an
//! allocation per request.
//!
//! A connection's task boxes the state of each request (its exchange, the forward to an
//! upstream, a timed write, an event stream being relayed) so that an idle connection holds
//! none of it: a monoio timer alone is 640 bytes, and an HTTP exchange is about 4 KiB. With
//! `Box::pin`, every request paid for an allocation and a free of that size (over-aligned, 128
//! bytes: monoio pads its timers to a cache line, so each went through `posix_memalign`), two
//! per proxied HTTP request. Here a finished future's block goes back to a per-thread (so
//! per-core) free list for its layout, and the next future of that layout takes it. [`new`] and
//! [`unbox`] do the same for a value that moves between owners as a `Box` (an event stream's
//! state). [`Boxed::erase`] turns a boxed future into a [`Task`] of erased type, for a list of
//! futures of one kind that a task polls itself (a WebSocket or MCPB session's forwards).
//!
//! Invariants:
//! - A block holds one future from [`pin`] until the [`Boxed`] is dropped (finished or
//!   cancelled); the future is dropped in place, never moved, before its block is reused. A
//!   block holds one value from [`new`] until [`unbox`] moves it out (or the box is dropped,
//!   freeing the block).
//! - Blocks are allocated by the global allocator with their type's layout, so a box of
//!   [`new`] is an ordinary `Box`, and [`unbox`] may take any `Box`.
//! - The free lists are per thread and bounded: at most [`KEEP`] blocks per layout; beyond, a
//!   block is freed. A thread's blocks are freed when it ends.
//! - Layouts are the boxed types', so there are as many lists as types boxed here (a
//!   dozen), each found by a short scan.

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::ptr::NonNull;
use std::task::{Context, Poll};

/// Free blocks kept per layout and thread: more than the requests a core has in flight at once
/// on a busy keep-alive benchmark (16 to 32), few enough to be noise in its memory.
pub const KEEP: usize = 32;

/// Blocks of one layout, free for the next future of that layout.
struct Free {
    layout: Layout,
    blocks: Vec<NonNull<u8>>,
}

/// This thread's free blocks, by layout.
struct Lists(Vec<Free>);

impl Drop for Lists {
    fn drop(&mut self) {
        for f in &self.0 {
            for b in &f.blocks {
                // SAFETY: every block in a list was allocated with its list's layout, and
                // holds no value (its future was dropped before it was listed).
                unsafe { dealloc(b.as_ptr(), f.layout) };
            }
        }
    }
}

thread_local! {
    static LISTS: RefCell<Lists> = const { RefCell::new(Lists(Vec::new())) };
}

/// A block for `layout` (not zero-sized): a free one of this thread, or a new one.
fn take_block(layout: Layout) -> NonNull<u8> {
    let reused = LISTS
        .try_with(|l| {
            let mut l = l.borrow_mut();
            l.0.iter_mut()
                .find(|f| f.layout == layout)
                .and_then(|f| f.blocks.pop())
        })
        .ok()
        .flatten();
    reused.unwrap_or_else(|| {
        // SAFETY: `layout` is not zero-sized (checked by the callers).
        let p = unsafe { alloc(layout) };
        NonNull::new(p).unwrap_or_else(|| handle_alloc_error(layout))
    })
}

/// Gives back a block of `layout` that holds no value any more.
fn give_block(layout: Layout, block: NonNull<u8>) {
    let kept = LISTS
        .try_with(|l| {
            let mut l = l.borrow_mut();
            let at = match l.0.iter().position(|f| f.layout == layout) {
                Some(at) => at,
                None => {
                    l.0.push(Free {
                        layout,
                        blocks: Vec::new(),
                    });
                    l.0.len() - 1
                }
            };
            let f = &mut l.0[at];
            if f.blocks.len() < KEEP {
                f.blocks.push(block);
                true
            } else {
                false
            }
        })
        .unwrap_or(false); // the thread is ending: its lists are gone
    if !kept {
        // SAFETY: the block was allocated with `layout` (by `take_block`, or as a `Box` of
        // that layout) and holds no value.
        unsafe { dealloc(block.as_ptr(), layout) };
    }
}

/// `value` in a `Box` whose block is this core's: [`unbox`] takes the value out and keeps the
/// block for the next. A box dropped instead frees its block, as any `Box` does.
pub fn new<T>(value: T) -> Box<T> {
    let layout = Layout::new::<T>();
    if layout.size() == 0 {
        return Box::new(value);
    }
    let at = take_block(layout).cast::<T>();
    // SAFETY: the block was allocated by the global allocator with `T`'s layout, which is what
    // `Box::from_raw` asks of it, and is initialized with `value` first.
    unsafe {
        at.as_ptr().write(value);
        Box::from_raw(at.as_ptr())
    }
}

/// The value of `b`, its block kept for the next [`new`] of a `T` (whoever allocated it).
pub fn unbox<T>(b: Box<T>) -> T {
    let layout = Layout::new::<T>();
    if layout.size() == 0 {
        return *b;
    }
    let at = Box::into_raw(b);
    // SAFETY: `at` holds the box's value, read once; the block then holds none, and was
    // allocated by the global allocator with `T`'s layout (a `Box<T>`'s).
    let value = unsafe { at.read() };
    // SAFETY: as above; `into_raw` gave up the box's ownership of the block.
    give_block(layout, unsafe { NonNull::new_unchecked(at.cast()) });
    value
}

/// `future`, pinned in a block of this core's (see the module documentation).
pub fn pin<F: Future>(future: F) -> Boxed<F> {
    let layout = Layout::new::<F>();
    let at = if layout.size() == 0 {
        NonNull::dangling()
    } else {
        take_block(layout).cast::<F>()
    };
    // SAFETY: `at` is valid for a write of `F` and aligned for it (a block of `F`'s layout, or
    // dangling for a zero-sized `F`), and holds no value.
    unsafe { at.as_ptr().write(future) };
    Boxed { at }
}

/// A future pinned in a reused block: polls it, and drops it in place when dropped.
pub struct Boxed<F: ?Sized> {
    /// The future: written by [`pin`], dropped by `Drop`, never moved in between.
    at: NonNull<F>,
}

/// A boxed future whose type is erased ([`Boxed::erase`]): futures of one kind kept in a list.
pub type Task = Boxed<dyn Future<Output = ()>>;

impl<F: Future<Output = ()> + 'static> Boxed<F> {
    /// The same box, its future's type erased: the block and the future stay where they are.
    pub fn erase(self) -> Task {
        let this = std::mem::ManuallyDrop::new(self);
        let at: NonNull<dyn Future<Output = ()>> = this.at;
        Boxed { at }
    }
}

impl<F: Future + ?Sized> Future for Boxed<F> {
    type Output = F::Output;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: the future lives at `at` until `Drop`, is never moved (only the pointer is,
        // with the `Boxed`), and is reached only through this `Boxed`.
        unsafe { Pin::new_unchecked(&mut *self.at.as_ptr()) }.poll(cx)
    }
}

impl<F: ?Sized> Drop for Boxed<F> {
    fn drop(&mut self) {
        // SAFETY: the future written by `pin` is still there (dropped just below); for an
        // erased one, the pointer's metadata is its type's, so the layout is the block's.
        let layout = Layout::for_value(unsafe { self.at.as_ref() });
        // SAFETY: the future written by `pin` is still there (it is dropped only here); after
        // this the block holds no value. Should its destructor panic, the block is leaked,
        // never listed.
        unsafe { self.at.as_ptr().drop_in_place() };
        if layout.size() != 0 {
            give_block(layout, self.at.cast());
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    /// Counts its drops.
    struct Dropped(Rc<Cell<usize>>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.set(self.0.get() + 1);
        }
    }

    /// Pending once, then ready: an await that suspends.
    struct YieldOnce(bool);
    impl Future for YieldOnce {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if std::mem::replace(&mut self.0, true) {
                return Poll::Ready(());
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    fn run<F: Future + ?Sized>(mut f: Boxed<F>) -> F::Output {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        loop {
            if let Poll::Ready(v) = Pin::new(&mut f).poll(&mut cx) {
                return v;
            }
        }
    }

    fn free_blocks(layout: Layout) -> usize {
        LISTS.with(|l| {
            l.borrow()
                .0
                .iter()
                .find(|f| f.layout == layout)
                .map_or(0, |f| f.blocks.len())
        })
    }

    /// Holds `d` until `f` is done (or the future is dropped).
    async fn holding(d: Dropped, f: impl Future<Output = ()>) {
        let _d = d;
        f.await
    }

    /// A request's state: big, and alive across an await.
    async fn exchange(n: u64, state: [u64; 64]) -> u64 {
        YieldOnce(false).await;
        n + state[63]
    }

    #[test]
    fn a_finished_futures_block_serves_the_next_one() {
        let mut state = [0u64; 64];
        state[63] = 5;
        let first = pin(exchange(1, state));
        let at = first.at.cast::<u8>();
        // SAFETY: the future is there until `first` is dropped.
        let layout = Layout::for_value(unsafe { first.at.as_ref() });
        assert_eq!(run(first), 6, "its state is kept across an await");
        assert_eq!(free_blocks(layout), 1);
        let second = pin(exchange(2, state));
        assert_eq!(second.at.cast::<u8>(), at, "the same block again");
        assert_eq!(free_blocks(layout), 0);
        assert_eq!(run(second), 7);
    }

    #[test]
    fn a_cancelled_future_is_dropped_in_place_and_its_block_kept() {
        let drops = Rc::new(Cell::new(0));
        let fut = holding(Dropped(drops.clone()), std::future::pending());
        let layout = Layout::for_value(&fut);
        let mut boxed = pin(fut);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Pin::new(&mut boxed).poll(&mut cx).is_pending());
        assert_eq!(drops.get(), 0);
        drop(boxed);
        assert_eq!(drops.get(), 1, "the future's state was dropped");
        assert_eq!(free_blocks(layout), 1, "its block is free again");
    }

    #[test]
    fn an_erased_future_runs_drops_and_gives_its_block_back_the_same() {
        let drops = Rc::new(Cell::new(0));
        let fut = holding(Dropped(drops.clone()), YieldOnce(false));
        let layout = Layout::for_value(&fut);
        let first = pin(fut);
        let at = first.at.cast::<u8>();
        let tasks: Vec<Task> = vec![first.erase()];
        assert_eq!(drops.get(), 0, "erasing moved only the pointer");
        for t in tasks {
            run(t);
        }
        assert_eq!(drops.get(), 1);
        assert_eq!(
            free_blocks(layout),
            1,
            "the block, listed under the future's layout"
        );
        let second = pin(holding(Dropped(drops.clone()), YieldOnce(false)));
        assert_eq!(second.at.cast::<u8>(), at, "the same block again");
        drop(second.erase()); // cancelled while erased
        assert_eq!((drops.get(), free_blocks(layout)), (2, 1));
    }

    #[test]
    fn an_unboxed_values_block_serves_the_next_box() {
        let layout = Layout::new::<[u64; 40]>();
        let b = new([7u64; 40]);
        let at = &*b as *const [u64; 40];
        assert_eq!(unbox(b), [7; 40]);
        assert_eq!(free_blocks(layout), 1);
        let c = new([8u64; 40]);
        assert!(std::ptr::eq(&*c, at), "the same block again");
        drop(c); // an ordinary box: its block is freed
        assert_eq!(free_blocks(layout), 0);
        // Any box may leave its block to the lists.
        assert_eq!(unbox(Box::new([9u64; 40])), [9; 40]);
        assert_eq!(free_blocks(layout), 1);
    }

    #[test]
    fn at_most_keep_blocks_are_kept_per_layout() {
        let all: Vec<_> = (0..KEEP + 10)
            .map(|i| pin(async move { [i as u8; 300] }))
            .collect();
        // SAFETY: the future is there until `all` is dropped.
        let layout = Layout::for_value(unsafe { all[0].at.as_ref() });
        drop(all);
        assert_eq!(free_blocks(layout), KEEP);
        // A zero-sized future takes no block.
        let z = pin(std::future::pending::<()>());
        assert_eq!(z.at, NonNull::dangling());
    }
}
