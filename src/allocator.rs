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
        // SAFETY: `ptr` came from this allocator with `layout` (the caller's contract); the
        // new block keeps the layout's alignment, as the impl block says.
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

    /// Allocates, grows and frees blocks of many sizes and alignments, checking each block's
    /// alignment and that its bytes survive a reallocation.
    #[test]
    fn blocks_have_their_layouts_alignment() {
        let allocator = Mimalloc;
        for align in [1, 2, 4, 8, 16, 32, 64, 4096] {
            for size in [1, 3, 8, 15, 24, 40, 100, 1000, 5000, 70_000, 2 << 20] {
                let layout = Layout::from_size_align(size, align).expect("layout");
                // SAFETY: the layout has a non-zero size; every block is freed with it.
                unsafe {
                    let zeroed = allocator.alloc_zeroed(layout);
                    assert!(!zeroed.is_null());
                    assert_eq!(zeroed as usize % align, 0, "size {size}, align {align}");
                    assert!((0..size).all(|i| *zeroed.add(i) == 0));
                    allocator.dealloc(zeroed, layout);

                    let block = allocator.alloc(layout);
                    assert!(!block.is_null());
                    assert_eq!(block as usize % align, 0, "size {size}, align {align}");
                    for i in 0..size {
                        *block.add(i) = (i % 251) as u8;
                    }
                    let grown = allocator.realloc(block, layout, size * 3);
                    assert!(!grown.is_null());
                    assert_eq!(grown as usize % align, 0, "size {size}, align {align}");
                    assert!((0..size).all(|i| *grown.add(i) == (i % 251) as u8));
                    let grown_layout = Layout::from_size_align(size * 3, align).expect("layout");
                    allocator.dealloc(grown, grown_layout);
                }
            }
        }
    }
}
