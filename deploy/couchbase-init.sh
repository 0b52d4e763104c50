#!/usr/bin/env bash
# Create the cluster, the bucket, the streamfit scope and its collections,
# and an application user with data rights on that bucket only.
# Runs once in the couchbase image (which ships couchbase-cli) after the
# server answers; every step tolerates a second run.
set -euo pipefail

host=${COUCHBASE_HOST:-couchbase}
bucket=${COUCHBASE_BUCKET:-streamfit}
scope=${COUCHBASE_SCOPE:-streamfit}
admin=${COUCHBASE_ADMIN_USERNAME:?set COUCHBASE_ADMIN_USERNAME in the env file}
admin_password=${COUCHBASE_ADMIN_PASSWORD:?set COUCHBASE_ADMIN_PASSWORD in the env file}
app_user=${STREAMFIT_COUCHBASE_USERNAME:?set STREAMFIT_COUCHBASE_USERNAME in the env file}
app_password=${STREAMFIT_COUCHBASE_PASSWORD:?set STREAMFIT_COUCHBASE_PASSWORD in the env file}

until curl -fsS "http://$host:8091/ui/index.html" >/dev/null; do sleep 2; done

couchbase-cli cluster-init -c "$host" --cluster-username "$admin" \
  --cluster-password "$admin_password" --services data,index,query \
  --cluster-ramsize 1024 || echo "cluster already initialised"

couchbase-cli bucket-create -c "$host" -u "$admin" -p "$admin_password" \
  --bucket "$bucket" --bucket-type couchbase --bucket-ramsize 512 --wait \
  || echo "bucket $bucket already exists"

couchbase-cli collection-manage -c "$host" -u "$admin" -p "$admin_password" \
  --bucket "$bucket" --create-scope "$scope" || echo "scope $scope already exists"
for collection in artifacts metadata heads predictions; do
  couchbase-cli collection-manage -c "$host" -u "$admin" -p "$admin_password" \
    --bucket "$bucket" --create-collection "$scope.$collection" \
    || echo "collection $scope.$collection already exists"
done

couchbase-cli user-manage -c "$host" -u "$admin" -p "$admin_password" --set \
  --rbac-username "$app_user" --rbac-password "$app_password" --auth-domain local \
  --roles "data_reader[$bucket],data_writer[$bucket]"
