// The BlobCreated subscription that delivers training files to `ingest`. Deployed after the code
// (infra/hooks/postdeploy.sh): the blob trigger's webhook key and the Event Grid trigger's
// function only exist once the app runs.

@description('The storage account system topic made by main.bicep.')
param systemTopicName string

@description('The function app made by main.bicep.')
param functionAppName string

@description('Container where training files land: only its blobs are delivered.')
param dataContainerName string

@allowed([
  'blob'
  'eventgrid'
])
@description('blob: the blob trigger webhook (needs blobsWebhookUrl); eventgrid: the Event Grid trigger function.')
param ingestTrigger string = 'blob'

@secure()
@description('For the blob trigger: https://<host>/runtime/webhooks/blobs?functionName=Host.Functions.ingest&code=<blobs_extension key>. Passed in by the hook, never stored in a file.')
param blobsWebhookUrl string = ''

resource topic 'Microsoft.EventGrid/systemTopics@2022-06-15' existing = {
  name: systemTopicName
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' existing = {
  name: functionAppName
}

var webhookDestination = {
  endpointType: 'WebHook'
  properties: {
    endpointUrl: blobsWebhookUrl
    maxEventsPerBatch: 1
    preferredBatchSizeInKilobytes: 64
  }
}
var functionDestination = {
  endpointType: 'AzureFunction'
  properties: {
    resourceId: '${functionApp.id}/functions/ingest'
    maxEventsPerBatch: 1
    preferredBatchSizeInKilobytes: 64
  }
}

resource toIngest 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2022-06-15' = {
  parent: topic
  name: 'retrain-ingest'
  properties: {
    destination: ingestTrigger == 'blob' ? webhookDestination : functionDestination
    eventDeliverySchema: 'EventGridSchema'
    filter: {
      includedEventTypes: [
        'Microsoft.Storage.BlobCreated'
      ]
      subjectBeginsWith: '/blobServices/default/containers/${dataContainerName}/blobs/'
    }
    retryPolicy: {
      maxDeliveryAttempts: 30
      eventTimeToLiveInMinutes: 1440
    }
  }
}
