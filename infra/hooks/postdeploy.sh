#!/bin/sh
# After `azd deploy` (or by hand, with the variables below set from main.bicep's outputs):
# subscribe `ingest` to the BlobCreated events of the data container. It cannot be part of
# main.bicep: the blob trigger's webhook key, and the Event Grid trigger's function, exist only
# once the deployed app has been indexed. The key goes from `az` into a private temporary
# parameters file and into the subscription; it is never printed or written anywhere else.
set -eu

: "${AZURE_RESOURCE_GROUP:?set by azd from main.bicep outputs}"
: "${AZURE_FUNCTION_APP_NAME:?set by azd from main.bicep outputs}"
: "${RETRAIN_SYSTEM_TOPIC_NAME:?set by azd from main.bicep outputs}"
: "${RETRAIN_DATA_CONTAINER:?set by azd from main.bicep outputs}"
trigger="${RETRAIN_INGEST_TRIGGER:-blob}"
rg="$AZURE_RESOURCE_GROUP"
app="$AZURE_FUNCTION_APP_NAME"
here="$(cd "$(dirname "$0")/.." && pwd)"
attempts="${RETRAIN_KEY_ATTEMPTS:-30}"

umask 077
params="$(mktemp)"
trap 'rm -f "$params"' EXIT

if [ "$trigger" = "blob" ]; then
  host="$(az functionapp show -g "$rg" -n "$app" --query defaultHostName -o tsv)"
  key=""
  # The host creates the blobs_extension system key when it first indexes a blob trigger whose
  # source is EventGrid; a request to the app starts an idle host. Bounded: attempts x 10 s.
  for _ in $(seq 1 "$attempts"); do
    key="$(az functionapp keys list -g "$rg" -n "$app" --query systemKeys.blobs_extension -o tsv 2>/dev/null || true)"
    [ -n "$key" ] && break
    curl -s -o /dev/null --max-time 10 "https://$host/" || true
    sleep 10
  done
  if [ -z "$key" ]; then
    echo "no blobs_extension key on $app after $attempts attempts: check that the code is" \
      "deployed and ingest is a blob trigger (RETRAIN_INGEST_TRIGGER=blob); then run this again" >&2
    exit 1
  fi
  printf '{"$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentParameters.json#", "contentVersion": "1.0.0.0", "parameters": {"blobsWebhookUrl": {"value": "https://%s/runtime/webhooks/blobs?functionName=Host.Functions.ingest&code=%s"}}}' \
    "$host" "$key" >"$params"
  unset key
else
  printf '{"$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentParameters.json#", "contentVersion": "1.0.0.0", "parameters": {}}' >"$params"
fi

az deployment group create -g "$rg" --name retrain-ingest-subscription --output none \
  --template-file "$here/eventgrid-subscription.bicep" \
  --parameters systemTopicName="$RETRAIN_SYSTEM_TOPIC_NAME" functionAppName="$app" \
    dataContainerName="$RETRAIN_DATA_CONTAINER" ingestTrigger="$trigger" \
  --parameters "@$params"
echo "Event Grid: BlobCreated in $RETRAIN_DATA_CONTAINER -> $app/ingest ($trigger trigger)"
