#!/usr/bin/env bash
# Sourced by the set-up scripts: `need_disk GiB WHAT` stops with one clear line, before pip
# starts writing, when the repository's file system (or pip's temporary folder) has less than
# GiB free. A full disk otherwise surfaces minutes later as pip's "[Errno 28] No space left on
# device" in the middle of an install, with a half-built environment left behind.
need_disk() {
  local need_gib=$1 what=$2 dir free_kib
  for dir in . "${TMPDIR:-/tmp}"; do
    free_kib=$(df -Pk "$dir" | awk 'NR == 2 {print $4}')
    if [ -n "$free_kib" ] && [ "$free_kib" -lt $((need_gib * 1024 * 1024)) ]; then
      echo "setup: $what needs about ${need_gib} GiB free on $(cd "$dir" && pwd) (df: $((free_kib / 1024)) MiB free); free some space and run again" >&2
      exit 1
    fi
  done
}
