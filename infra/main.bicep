// The retrain function app on Flex Consumption, with no shared key and no secret in any setting:
// storage reached with a user-assigned identity, telemetry with Entra auth, BES and endpoint API
// keys as Key Vault references. Plain resources only (no registry modules), so the template can
// be parsed and policy-checked offline (make infra-check).
//
// Not here, because it needs the deployed code: the Event Grid subscription that delivers
// BlobCreated events to `ingest` (infra/eventgrid-subscription.bicep, run by
// infra/hooks/postdeploy.sh after `azd deploy`).

@minLength(1)
@maxLength(64)
@description('Name of the azd environment; seeds the unique suffix of every resource name.')
param environmentName string

@description('Region of every resource; must offer the Flex Consumption plan.')
param location string = resourceGroup().location

@description('The model specs (a JSON list, as in README "Configuration"), written to RETRAIN_MODELS.')
param modelSpecs array

@description('App setting name -> Key Vault reference (@Microsoft.KeyVault(SecretUri=https://<vault>.vault.azure.net/secrets/<name>)) for every api_key_setting the model specs name; resolved with the app identity, which needs Key Vault Secrets User on the vault.')
param keyVaultReferences object = {}

@description('Resource ids of the New (ARM) web services (Microsoft.MachineLearning/webServices) or Azure ML workspaces (Microsoft.MachineLearningServices/workspaces) the app promotes models to; each gets a role for the app identity. Empty for Classic targets only.')
param targetResourceIds array = []

@allowed([
  'blob'
  'eventgrid'
])
@description('How ingest is triggered: the blob trigger with its Event Grid source (blob), or an Event Grid trigger (eventgrid). Both get BlobCreated events from the subscription made after deploy.')
param ingestTrigger string = 'blob'

@allowed([
  512
  2048
  4096
])
@description('Memory of each Flex Consumption instance (MB).')
param instanceMemoryMB int = 2048

@minValue(40)
@maxValue(1000)
@description('Most instances the app scales out to.')
param maximumInstanceCount int = 40

@minLength(3)
@maxLength(63)
@description('Container where training files land (RETRAIN_DATA_CONTAINER); the Event Grid subscription filters on it.')
param dataContainerName string = 'training-data'

@minLength(3)
@maxLength(63)
param artifactsContainerName string = 'retrain-artifacts'

@minLength(3)
@maxLength(63)
param stateContainerName string = 'retrain-state'

@minLength(3)
@maxLength(63)
param quarantineContainerName string = 'retrain-quarantine'

@minLength(3)
@maxLength(63)
param jobsQueueName string = 'retrain-jobs'

@minLength(3)
@maxLength(63)
param evaluationsQueueName string = 'retrain-evaluations'

@minLength(3)
@maxLength(63)
param eventsQueueName string = 'retrain-events'

@description('CRON schedule of the sweep (RETRAIN_SWEEP_SCHEDULE, six fields).')
param sweepSchedule string = '0 */5 * * * *'

@description('RETRAIN_SWEEP_STALL (ISO 8601 duration).')
param sweepStall string = 'PT15M'

@description('RETRAIN_POLL_FIRST_DELAY (ISO 8601 duration, at least 1 s).')
param pollFirstDelay string = 'PT30S'

@description('RETRAIN_POLL_MAX_DELAY (ISO 8601 duration).')
param pollMaxDelay string = 'PT10M'

@description('RETRAIN_HTTP_CONNECT_TIMEOUT in seconds.')
param httpConnectTimeout string = '5'

@description('RETRAIN_HTTP_READ_TIMEOUT in seconds.')
param httpReadTimeout string = '60'

@description('RETRAIN_HTTP_MAX_RETRY_WAIT in seconds (1 to 60).')
param httpMaxRetryWait string = '5'

@description('RETRAIN_WEBHOOK_URL (https); empty for no webhook.')
param webhookUrl string = ''

@description('Key Vault secret URI of the webhook signing secret (RETRAIN_WEBHOOK_SECRET); empty for unsigned posts.')
param webhookSecretUri string = ''

@description('Azure ML workspace role for the app identity: AzureML Data Scientist by default.')
param workspaceRoleDefinitionId string = 'f6c7c914-8db3-469d-8ca1-694a8f32e121'

var suffix = toLower(uniqueString(subscription().id, resourceGroup().id, environmentName))
var tags = {
  'azd-env-name': environmentName
}
var functionAppName = 'func-retrain-${suffix}'
var deploymentContainerName = 'app-package-${suffix}'
var dataQueues = [
  jobsQueueName
  evaluationsQueueName
  eventsQueueName
]
var appContainers = [
  dataContainerName
  artifactsContainerName
  stateContainerName
  quarantineContainerName
  deploymentContainerName
]

// ---------------------------------------------------------------- identity

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: 'id-retrain-${suffix}'
  location: location
  tags: tags
}

// ---------------------------------------------------------------- storage

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: 'stretrain${suffix}'
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    supportsHttpsTrafficOnly: true
    minimumTlsVersion: 'TLS1_2'
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: 7
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: 7
    }
  }
}

resource containers 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = [for name in appContainers: {
  parent: blobService
  name: name
  properties: {
    publicAccess: 'None'
  }
}]

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

// The -poison queues are created by the host on the first message that fails every delivery.
resource queues 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = [for name in dataQueues: {
  parent: queueService
  name: name
}]

// ---------------------------------------------------------------- roles of the app identity
// Built-in role definition ids are the same in every tenant. Host storage needs (Functions docs,
// "Connecting to host storage with an identity"): Blob Data Owner (coordination, key store,
// timer locks; it also covers user delegation keys for the SAS the app mints), Queue Data
// Contributor (queue triggers, the blob trigger's queue and the app's own messages), Table Data
// Contributor (the host's diagnostic events). The blob trigger also needs Storage Account
// Contributor on the AzureWebJobsStorage account; the Event Grid trigger does not.

resource blobDataOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: storage
  name: guid(storage.id, identity.id, 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b')
  properties: {
    // Storage Blob Data Owner
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b')
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource queueDataContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: storage
  name: guid(storage.id, identity.id, '974c5e8b-45b9-4653-ba55-5f855dd0fb88')
  properties: {
    // Storage Queue Data Contributor
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '974c5e8b-45b9-4653-ba55-5f855dd0fb88')
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource tableDataContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: storage
  name: guid(storage.id, identity.id, '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3')
  properties: {
    // Storage Table Data Contributor
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3')
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource storageAccountContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (ingestTrigger == 'blob') {
  scope: storage
  name: guid(storage.id, identity.id, '17d1049b-9a84-46fb-8f53-869881c3d3ab')
  properties: {
    // Storage Account Contributor
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '17d1049b-9a84-46fb-8f53-869881c3d3ab')
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource metricsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: appInsights
  name: guid(appInsights.id, identity.id, '3913510d-42f4-4e42-8a64-420c390055eb')
  properties: {
    // Monitoring Metrics Publisher: telemetry with Entra auth (local auth is off)
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '3913510d-42f4-4e42-8a64-420c390055eb')
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// New web services and Azure ML workspaces may live in other resource groups or subscriptions.
module targetRoles 'target-role.bicep' = [for (targetId, i) in targetResourceIds: {
  name: 'retrain-target-role-${i}'
  scope: resourceGroup(split(targetId, '/')[2], split(targetId, '/')[4])
  params: {
    targetResourceId: targetId
    principalId: identity.properties.principalId
    workspaceRoleDefinitionId: workspaceRoleDefinitionId
  }
}]

// ---------------------------------------------------------------- monitoring

resource logAnalytics 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: 'log-retrain-${suffix}'
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: 30
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: 'appi-retrain-${suffix}'
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: logAnalytics.id
    DisableLocalAuth: true
  }
}

// ---------------------------------------------------------------- function app

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: 'plan-retrain-${suffix}'
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
  }
}

// Every setting the app reads (retrain/settings.py, function_app.py). The storage connection is
// identity-based: service URIs plus the user-assigned identity's client id, never a key.
var baseSettings = {
  AzureWebJobsStorage__blobServiceUri: storage.properties.primaryEndpoints.blob
  AzureWebJobsStorage__queueServiceUri: storage.properties.primaryEndpoints.queue
  AzureWebJobsStorage__tableServiceUri: storage.properties.primaryEndpoints.table
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identity.properties.clientId
  AZURE_CLIENT_ID: identity.properties.clientId
  // The App Insights connection string names the ingestion endpoint; with DisableLocalAuth its
  // instrumentation key alone is refused, and telemetry is sent with the identity below.
  APPLICATIONINSIGHTS_CONNECTION_STRING: appInsights.properties.ConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identity.properties.clientId};Authorization=AAD'
  RETRAIN_INGEST_TRIGGER: ingestTrigger
  RETRAIN_BLOB_SOURCE: 'EventGrid'
  RETRAIN_DATA_CONTAINER: dataContainerName
  RETRAIN_ARTIFACTS_CONTAINER: artifactsContainerName
  RETRAIN_STATE_CONTAINER: stateContainerName
  RETRAIN_QUARANTINE_CONTAINER: quarantineContainerName
  RETRAIN_JOBS_QUEUE: jobsQueueName
  RETRAIN_EVALUATIONS_QUEUE: evaluationsQueueName
  RETRAIN_EVENTS_QUEUE: eventsQueueName
  RETRAIN_MODELS: string(modelSpecs)
  RETRAIN_SWEEP_SCHEDULE: sweepSchedule
  RETRAIN_SWEEP_STALL: sweepStall
  RETRAIN_POLL_FIRST_DELAY: pollFirstDelay
  RETRAIN_POLL_MAX_DELAY: pollMaxDelay
  RETRAIN_HTTP_CONNECT_TIMEOUT: httpConnectTimeout
  RETRAIN_HTTP_READ_TIMEOUT: httpReadTimeout
  RETRAIN_HTTP_MAX_RETRY_WAIT: httpMaxRetryWait
  RETRAIN_WEBHOOK_URL: webhookUrl
}
var webhookSecretSetting = empty(webhookSecretUri) ? {} : {
  RETRAIN_WEBHOOK_SECRET: '@Microsoft.KeyVault(SecretUri=${webhookSecretUri})'
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  name: functionAppName
  location: location
  tags: union(tags, {
    'azd-service-name': 'retrain'
  })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identity.id}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    keyVaultReferenceIdentity: identity.id
    siteConfig: {
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identity.id
          }
        }
      }
      scaleAndConcurrency: {
        instanceMemoryMB: instanceMemoryMB
        maximumInstanceCount: maximumInstanceCount
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
  }
}

resource appSettings 'Microsoft.Web/sites/config@2024-04-01' = {
  parent: functionApp
  name: 'appsettings'
  properties: union(baseSettings, webhookSecretSetting, keyVaultReferences)
  dependsOn: [
    blobDataOwner
    queueDataContributor
    tableDataContributor
    metricsPublisher
    containers
    queues
  ]
}

// Disable basic-auth (publishing credentials) for deployment endpoints: azd deploys with Entra.
resource scmBasicAuth 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: functionApp
  name: 'scm'
  properties: {
    allow: false
  }
}

resource ftpBasicAuth 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: functionApp
  name: 'ftp'
  properties: {
    allow: false
  }
}

// ---------------------------------------------------------------- Event Grid

// The system topic of the storage account; its subscription to `ingest` is made after deploy.
resource blobEvents 'Microsoft.EventGrid/systemTopics@2022-06-15' = {
  name: 'evgt-retrain-${suffix}'
  location: location
  tags: tags
  properties: {
    source: storage.id
    topicType: 'Microsoft.Storage.StorageAccounts'
  }
}

output AZURE_LOCATION string = location
output AZURE_RESOURCE_GROUP string = resourceGroup().name
output AZURE_FUNCTION_APP_NAME string = functionApp.name
output AZURE_STORAGE_ACCOUNT_NAME string = storage.name
output RETRAIN_SYSTEM_TOPIC_NAME string = blobEvents.name
output RETRAIN_DATA_CONTAINER string = dataContainerName
output RETRAIN_INGEST_TRIGGER string = ingestTrigger
output AZURE_CLIENT_ID string = identity.properties.clientId
