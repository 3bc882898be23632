# Tessera: build, lint, test and run. `make test` is what CI runs (.ci/run).
# Everything builds with --release, so one profile is compiled, not two.
#
#   make deps      install missing apt packages, rustfmt/clippy, pjdfstest (.ci/deps.sh)
#   make build     cargo build --release
#   make lint      cargo fmt --check; cargo clippy --all-targets -D warnings
#   make unit      cargo test --release
#   make fs-tests  fs-tests/run-all.sh against target/release/tessera (root: pjdfstest, fulldisk)
#   make test      deps, lint, unit, fs-tests, in that order
#   make run       build, init ./tessera-data/ds once, serve it over NFSv3 on 127.0.0.1:2049
#                  and mount it on ./tessera-data/mnt
#                  in the foreground (Ctrl-C or SIGTERM flushes everything and stops)

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := build
# the targets of `test` must run one after the other even under make -j
.NOTPARALLEL:

export PATH := $(or $(CARGO_HOME),$(HOME)/.cargo)/bin:$(PATH)

CARGO       ?= cargo
CARGO_FLAGS ?= --release --locked
TARGET_DIR  ?= $(or $(CARGO_TARGET_DIR),target)
TESSERA     ?= $(abspath $(TARGET_DIR))/release/tessera
DATA        ?= $(CURDIR)/tessera-data

.PHONY: deps build lint unit fs-tests test run bench bench-report deb

deps:
	.ci/deps.sh

build:
	$(CARGO) build $(CARGO_FLAGS)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets $(CARGO_FLAGS) -- -D warnings

unit:
	$(CARGO) test $(CARGO_FLAGS)

fs-tests: build
	TESSERA=$(TESSERA) fs-tests/run-all.sh

test: deps lint unit fs-tests

# The Debian package (target/debian/tessera_*.deb): the release binary, man pages, shell
# completions, systemd units, the mount helper (mount -t fuse.tessera, fstab), examples.
deb: build
	mkdir -p target/completions
	"$(TESSERA)" completions bash >target/completions/tessera.bash
	"$(TESSERA)" completions zsh >target/completions/_tessera
	"$(TESSERA)" completions fish >target/completions/tessera.fish
	$(CARGO) deb --no-build --locked --strip

run:
	RUNTIME_ONLY=1 .ci/deps.sh
	$(CARGO) build $(CARGO_FLAGS)
	@if [ ! -d "$(DATA)/ds" ] || [ -z "$$(ls -A "$(DATA)/ds")" ]; then \
		mkdir -p "$(DATA)"; \
		echo "tessera init $(DATA)/ds"; \
		"$(TESSERA)" init "$(DATA)/ds"; \
	fi
	@mkdir -p "$(DATA)/mnt"
	@echo "serving $(DATA)/ds over NFS (nfs://127.0.0.1/ds) and on $(DATA)/mnt (Ctrl-C to stop)"
	"$(TESSERA)" serve "$(DATA)/ds" --nfs 127.0.0.1:2049 --mount "$(DATA)/mnt"

# Benchmarks (root; need ../shared/tools/peers, fio, jq, bindfs, btrfs-progs; nfs.sh and
# nfs_meta.sh install nfs-ganesha, nfs.sh builds the corpus if missing): see benches/README.md.
# Each writes benches/results/<script>.json; bench-report turns them into the tables of
# benches/README.md and the summary in README.md (between the bench:begin/end markers).
bench: build
	BENCH_MIB=1024 $(CARGO) bench --locked --bench engine
	benches/clone.sh
	benches/fio.sh
	benches/rss.sh
	benches/nfs.sh
	benches/nfs_meta.sh
	benches/vdi.sh
	benches/space.sh
	benches/corpus.sh
	benches/bootstorm.sh
	benches/replication.sh
	benches/s3.sh
	$(MAKE) bench-report

bench-report:
	python3 benches/report.py
