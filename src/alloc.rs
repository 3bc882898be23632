//! The daemon's memory allocator: jemalloc, tuned to give freed memory back within a second.
//!
//! Why not glibc's malloc: under the 4-client VDI pool (benches/vdi.sh) glibc held 450-500 MiB
//! resident for at most 275 MiB in use (`mallinfo2`, sampled every 0.5 s). Write-back chunks
//! and RPC records freed between long-lived cache and metadata pages leave holes that an arena
//! returns only from its top; `malloc_trim` every second released them but held the arena
//! locks for 20-90 ms each time (write p99 up), and fewer arenas cost 15 % of the IOPS.
//! jemalloc keeps blocks of one size class together and purges unused pages from background
//! threads: peak RSS 368-374 MiB in the same runs, IOPS within the noise of glibc's. mimalloc
//! was tried too and held more (660 MiB: pages freed by other threads stay with the
//! thread that allocated them).

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once at its first allocation (`man jemalloc`, "TUNING"):
/// - `background_thread`: purge unused pages from jemalloc's own threads, not inside the
///   callers' frees, so the purging happens even while a thread is idle;
/// - `dirty_decay_ms:250`: freed pages go back to the system within about 250 ms (the
///   default, 10 s, kept 550 MiB resident in the pool); `muzzy_decay_ms:0` skips the lazy
///   second stage, so what is purged stops counting as resident at once;
/// - `narenas:4` (the default is 4 per core): fewer arenas hold fewer partly used pages; one
///   run with the default arenas gave the same IOPS.
#[allow(non_upper_case_globals)]
// jemalloc reads `const char *malloc_conf`, here with the `_rjem_` prefix tikv-jemalloc-sys
// builds it with. A reference to an array is a thin pointer, laid out as that `char *`, and
// the string ends with its NUL.
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8; 69] =
    b"background_thread:true,dirty_decay_ms:250,muzzy_decay_ms:0,narenas:4\0";

#[cfg(test)]
mod tests {
    /// Protects the tuning above: a misspelled symbol or option is ignored by jemalloc without
    /// a word, and the daemon's memory grows back past the bound benches/vdi.sh checks.
    #[test]
    fn jemalloc_reads_the_tuning() {
        assert!(tikv_jemalloc_ctl::opt::background_thread::read().unwrap());
        assert_eq!(tikv_jemalloc_ctl::opt::narenas::read().unwrap(), 4);
    }
}
