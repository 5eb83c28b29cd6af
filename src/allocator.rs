//! The process's allocator: mimalloc, called through its plain entry points where they give
//! the alignment a layout needs.
//!
//! The `mimalloc` crate's allocator passes every layout to `mi_malloc_aligned`, whose checks
//! cost more than the allocation itself on the small buffers a request allocates and frees.
//! Every block size of mimalloc is a multiple of a machine word, so `mi_malloc` returns blocks
//! aligned to a word at least. A layout whose alignment is at most a word therefore goes to the
//! plain entry points, and any other layout to the aligned ones.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as ffi;

/// The alignment every `mi_malloc` block has.
const WORD: usize = std::mem::size_of::<usize>();

/// mimalloc, as the global allocator of `main.rs`.
pub struct Mimalloc;

// SAFETY: each method passes the layout's size on to mimalloc, which returns null or a block of
// at least that size. A block comes from the aligned entry points unless the layout's alignment
// is at most a word, which every mimalloc block has. mimalloc frees and reallocates any block it
// returned, whichever entry point returned it.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl block.
        unsafe {
            if layout.align() <= WORD {
                ffi::mi_malloc(layout.size()).cast()
            } else {
                ffi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl block.
        unsafe {
            if layout.align() <= WORD {
                ffi::mi_zalloc(layout.size()).cast()
            } else {
                ffi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (the caller's contract).
        unsafe { ffi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout` (the caller's contract). The
        // new block keeps the layout's alignment, for the reason given above the impl block.
        unsafe {
            if layout.align() <= WORD {
                ffi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                ffi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Allocates, zeroes, grows, shrinks and frees blocks of many sizes and alignments, checking
    /// each block's alignment and that its bytes survive every reallocation.
    #[test]
    fn blocks_keep_alignment_and_bytes() {
        let allocator = Mimalloc;
        let pattern = |i: usize| (i % 251) as u8;
        for align in [1, 2, 4, 8, 16, 32, 64, 4096, 1 << 17, 1 << 21] {
            for size in [1, 3, 8, 15, 24, 40, 100, 1000, 5000, 70_000, 2 << 20] {
                let layout = Layout::from_size_align(size, align).expect("layout");
                // SAFETY: every layout has a non-zero size, every block is used within its size
                // and freed with the layout it was last allocated or reallocated with.
                unsafe {
                    // A block filled with 0xFF and freed first, so that the zeroed block is
                    // likely to reuse dirty memory rather than fresh pages from the kernel.
                    let dirty = allocator.alloc(layout);
                    assert!(!dirty.is_null());
                    dirty.write_bytes(0xFF, size);
                    allocator.dealloc(dirty, layout);
                    let zeroed = allocator.alloc_zeroed(layout);
                    assert!(!zeroed.is_null());
                    assert_eq!(zeroed as usize % align, 0, "size {size}, align {align}");
                    assert!(
                        (0..size).all(|i| *zeroed.add(i) == 0),
                        "size {size}, align {align}"
                    );
                    allocator.dealloc(zeroed, layout);

                    let block = allocator.alloc(layout);
                    assert!(!block.is_null());
                    assert_eq!(block as usize % align, 0, "size {size}, align {align}");
                    for i in 0..size {
                        *block.add(i) = pattern(i);
                    }
                    let grown_size = size * 3;
                    let grown = allocator.realloc(block, layout, grown_size);
                    assert!(!grown.is_null());
                    assert_eq!(grown as usize % align, 0, "size {size}, align {align}");
                    assert!((0..size).all(|i| *grown.add(i) == pattern(i)));

                    let grown_layout = Layout::from_size_align(grown_size, align).expect("layout");
                    let shrunk_size = size / 2 + 1;
                    let shrunk = allocator.realloc(grown, grown_layout, shrunk_size);
                    assert!(!shrunk.is_null());
                    assert_eq!(shrunk as usize % align, 0, "size {size}, align {align}");
                    assert!((0..shrunk_size).all(|i| *shrunk.add(i) == pattern(i)));
                    let shrunk_layout =
                        Layout::from_size_align(shrunk_size, align).expect("layout");
                    allocator.dealloc(shrunk, shrunk_layout);
                }
            }
        }
    }
}
