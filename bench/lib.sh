# Shared by the benchmark scripts: tools, the release build, and a journaled ext4
# scratch image (the root filesystem here has no journal, which makes file creation
# after large deletes meaningless to time).

# install_tools: restic (the peer), GNU time, bc.
install_tools() {
  local need=()
  command -v restic >/dev/null 2>&1 || need+=(restic)
  [ -x /usr/bin/time ] || need+=(time)
  command -v bc >/dev/null 2>&1 || need+=(bc)
  if [ ${#need[@]} -gt 0 ]; then apt-get update -qq; apt-get install -y -qq "${need[@]}" >/dev/null; fi
}

# build_vaultik: sets VAULTIK to a fresh release binary.
build_vaultik() {
  cargo build --release --quiet -p edge-agent
  VAULTIK="$PWD/target/release/vaultik"
}

# mount_scratch SCRATCH SIZE [mkfs.ext4 options]: a new image mounted at SCRATCH/mnt,
# removed on exit; sets W to the mount point.
mount_scratch() {
  local scratch=$1 size=$2; shift 2
  mkdir -p "$scratch"
  mountpoint -q "$scratch/mnt" 2>/dev/null && umount "$scratch/mnt"
  rm -f "$scratch/fs.img"
  truncate -s "$size" "$scratch/fs.img"
  mkfs.ext4 -q -F "$@" "$scratch/fs.img"
  mkdir -p "$scratch/mnt"
  mount -o loop "$scratch/fs.img" "$scratch/mnt"
  # shellcheck disable=SC2064 # expand now: the trap must name this image
  trap "cd /; umount '$scratch/mnt' 2>/dev/null; rm -f '$scratch/fs.img'" EXIT
  W="$scratch/mnt"
}
