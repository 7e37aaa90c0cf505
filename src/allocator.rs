//! The process allocator: jemalloc, for every binary that links this library.
//!
//! Under glibc malloc, allocation was ~40% of the worker's CPU samples: every event makes
//! many short-lived buffers, freed on other threads than the ones that made them. jemalloc
//! cut the worker's CPU per event by about a third in the benchmark (docs/PERFORMANCE.md).
//!
//! Its options, compiled in (`_RJEM_MALLOC_CONF` in the environment overrides them, e.g.
//! `narenas:4` on a pod with many cores):
//! - `narenas:1`: one arena behind the per-thread caches. The default (four per core)
//!   kept each arena's freed pages apart: peak RSS in `returning` 103 MiB, against 89–94
//!   with one arena, at the same or lower CPU per event;
//! - `background_thread:true`: unused pages go back to the OS from a background thread,
//!   not inside a batch's allocations;
//! - `dirty_decay_ms:500`, `muzzy_decay_ms:0`: freed pages are returned within half a
//!   second. Returning them at once (`dirty_decay_ms:0`) cost 60% more worker CPU.

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Read by jemalloc when it initializes (before `main`), under its prefixed symbol name.
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: Option<&'static std::ffi::c_char> = Some({
    let conf = c"narenas:1,background_thread:true,dirty_decay_ms:500,muzzy_decay_ms:0";
    // SAFETY: a C string literal is 'static and NUL-terminated; its first byte is valid.
    unsafe { &*conf.as_ptr() }
});

#[cfg(test)]
mod tests {
    use std::ffi::{c_char, c_void, CStr};

    /// A jemalloc option of C type `T` (ssize_t, unsigned, ...).
    fn opt<T: Default>(name: &CStr) -> T {
        let mut value = T::default();
        let mut len = std::mem::size_of::<T>();
        // SAFETY: the caller names an option whose C type is `T`; `value` and `len` describe it.
        let rc = unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr() as *const c_char,
                &mut value as *mut T as *mut c_void,
                &mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        assert_eq!(rc, 0, "mallctl {name:?}");
        value
    }

    #[test]
    fn jemalloc_runs_with_the_compiled_in_options() {
        // Only meaningful when the environment does not override them.
        if std::env::var_os("_RJEM_MALLOC_CONF").is_some() {
            return;
        }
        assert_eq!(opt::<u32>(c"opt.narenas"), 1);
        assert_eq!(opt::<isize>(c"opt.dirty_decay_ms"), 500);
        assert_eq!(opt::<isize>(c"opt.muzzy_decay_ms"), 0);
        assert!(opt::<bool>(c"opt.background_thread"));
    }
}
