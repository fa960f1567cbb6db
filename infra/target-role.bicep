// The app identity's role on one promotion target, deployed into the target's resource group:
// Contributor on a New (ARM) web service (README: the PATCH of its trained-model asset), or the
// workspace role on an Azure ML workspace.

@description('Resource id of a Microsoft.MachineLearning/webServices or Microsoft.MachineLearningServices/workspaces resource.')
param targetResourceId string

@description('Object (principal) id of the app identity.')
param principalId string

@description('Role definition id (GUID) to grant on a workspace.')
param workspaceRoleDefinitionId string

var parts = split(targetResourceId, '/')
var targetType = toLower('${parts[6]}/${parts[7]}')
var isWebService = targetType == 'microsoft.machinelearning/webservices'
var isWorkspace = targetType == 'microsoft.machinelearningservices/workspaces'

resource webService 'Microsoft.MachineLearning/webServices@2017-01-01' existing = if (isWebService) {
  name: parts[8]
}

resource workspace 'Microsoft.MachineLearningServices/workspaces@2024-04-01' existing = if (isWorkspace) {
  name: parts[8]
}

resource webServiceContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (isWebService) {
  scope: webService
  name: guid(targetResourceId, principalId, 'b24988ac-6180-42a0-ab88-20f7382dd24c')
  properties: {
    // Contributor
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', 'b24988ac-6180-42a0-ab88-20f7382dd24c')
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

resource workspaceRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (isWorkspace) {
  scope: workspace
  name: guid(targetResourceId, principalId, workspaceRoleDefinitionId)
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', workspaceRoleDefinitionId)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

// A resource id of any other type assigns nothing: say so in the deployment's outputs.
output assigned bool = isWebService || isWorkspace
