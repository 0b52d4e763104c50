#!/usr/bin/env bash
# Prepare a fresh Couchbase Server node for streamfit: name the node,
# initialise the cluster, create the bucket, the scope and its four
# collections, and an application user whose roles reach that scope only.
#
# Runs once in the couchbase/server image, which ships couchbase-cli and
# curl. Each step first checks whether its work is done, so the job may run
# again. Any other failure stops it with a non-zero exit, so the services
# that depend on it do not start.
#
# NOTE: no Couchbase Server runs where streamfit is developed (the tests use
# gocaves, which has no management API), so this script is checked with
# `bash -n` and shellcheck when present, not by running it.
set -euo pipefail

host=${COUCHBASE_HOST:-couchbase}
bucket=${COUCHBASE_BUCKET:-streamfit}
scope=${COUCHBASE_SCOPE:-streamfit}
cluster_ram_mb=${COUCHBASE_CLUSTER_RAM_MB:-1024}
bucket_ram_mb=${COUCHBASE_BUCKET_RAM_MB:-512}
admin=${COUCHBASE_ADMIN_USERNAME:?set COUCHBASE_ADMIN_USERNAME in .env}
admin_password=${COUCHBASE_ADMIN_PASSWORD:?set COUCHBASE_ADMIN_PASSWORD in .env}
app_user=${STREAMFIT_COUCHBASE_USERNAME:?set STREAMFIT_COUCHBASE_USERNAME in .env}
app_password=${STREAMFIT_COUCHBASE_PASSWORD:?set STREAMFIT_COUCHBASE_PASSWORD in .env}
collections=(artifacts metadata heads predictions)

# couchbase-cli reads the administrator's credentials from these variables,
# which keeps the password out of the process list.
export CB_REST_USERNAME=$admin CB_REST_PASSWORD=$admin_password

wait_for_server() {
  for _ in $(seq 1 90); do
    if curl -fsS -o /dev/null "http://$host:8091/ui/index.html"; then
      return 0
    fi
    sleep 2
  done
  echo "Couchbase Server at $host:8091 did not answer within 180 s" >&2
  return 1
}

# Succeeds when the REST path returns 200 to the administrator. curl reads
# the credentials from its config on stdin, not from its arguments.
rest_ok() {
  printf 'user = "%s:%s"\n' "$admin" "$admin_password" |
    curl -fsS -o /dev/null -K - "http://$host:8091$1"
}

# Runs a couchbase-cli command that creates something; "already exists"
# counts as success, any other error fails the job with the CLI's message.
create_once() {
  local what=$1 output
  shift
  if output=$(couchbase-cli "$@" 2>&1); then
    echo "created $what"
  elif grep -qi "already exists" <<<"$output"; then
    echo "$what already exists"
  else
    echo "creating $what failed: $output" >&2
    return 1
  fi
}

wait_for_server

if rest_ok /pools/default; then
  echo "cluster at $host already initialised"
else
  # Clients reach the node by this name inside the compose network; an
  # unnamed single node would call itself 127.0.0.1.
  couchbase-cli node-init -c "$host" --node-init-hostname "$host"
  couchbase-cli cluster-init -c "$host" --cluster-username "$admin" \
    --cluster-password "$admin_password" --services data,index,query \
    --cluster-ramsize "$cluster_ram_mb"
fi

if rest_ok "/pools/default/buckets/$bucket"; then
  echo "bucket $bucket already exists"
else
  couchbase-cli bucket-create -c "$host" --bucket "$bucket" --bucket-type couchbase \
    --bucket-ramsize "$bucket_ram_mb" --wait
fi

create_once "scope $scope" collection-manage -c "$host" --bucket "$bucket" --create-scope "$scope"
for collection in "${collections[@]}"; do
  create_once "collection $scope.$collection" collection-manage -c "$host" --bucket "$bucket" \
    --create-collection "$scope.$collection"
done

# Read and write documents in the streamfit scope, nothing else: the
# application user cannot manage buckets, scopes, users or other data.
couchbase-cli user-manage -c "$host" --set --auth-domain local \
  --rbac-username "$app_user" --rbac-password "$app_password" \
  --roles "data_reader[$bucket:$scope],data_writer[$bucket:$scope]"

echo "Couchbase is ready: bucket $bucket, scope $scope, collections ${collections[*]}, user $app_user"
