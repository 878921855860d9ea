{{/* Chart name, overridable. */}}
{{- define "costwarden.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Prefix of every object name: the release name when it already contains the chart name
(`helm install costwarden ...` gives `costwarden-operator`), else <release>-<chart>.
*/}}
{{- define "costwarden.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "costwarden.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "costwarden.labels" -}}
helm.sh/chart: {{ include "costwarden.chart" . }}
app.kubernetes.io/name: {{ include "costwarden.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: costwarden
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of one component (operator, gateway): call with (dict "ctx" $ "component" "x"). */}}
{{- define "costwarden.componentLabels" -}}
{{ include "costwarden.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Immutable selector labels of one component. */}}
{{- define "costwarden.selectorLabels" -}}
app.kubernetes.io/name: {{ include "costwarden.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "costwarden.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "costwarden.operator.fullname" -}}
{{- printf "%s-operator" (include "costwarden.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "costwarden.gateway.fullname" -}}
{{- printf "%s-gateway" (include "costwarden.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "costwarden.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "costwarden.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "costwarden.gateway.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create }}
{{- default (include "costwarden.gateway.fullname" .) .Values.gateway.serviceAccount.name }}
{{- else }}
{{- required "gateway.serviceAccount.name is required when gateway.serviceAccount.create is false" .Values.gateway.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The ConfigMap the operator renders and the gateways read (costwarden-gateway-config for a release named costwarden). */}}
{{- define "costwarden.gatewayConfigName" -}}
{{- printf "%s-gateway-config" (include "costwarden.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "costwarden.pricesConfigName" -}}
{{- printf "%s-prices" (include "costwarden.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The Secret the operator mirrors provider keys into and the gateway mounts (costwarden-provider-keys for a release named costwarden). */}}
{{- define "costwarden.providerKeysSecretName" -}}
{{- printf "%s-provider-keys" (include "costwarden.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "costwarden.peeringName" -}}
{{- include "costwarden.fullname" . }}
{{- end }}

{{/* The operator's usage-ingestion Service (HTTPS) and the ConfigMap with its CA bundle. */}}
{{- define "costwarden.ingestServiceName" -}}
{{- printf "%s-ingest" (include "costwarden.operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "costwarden.ingestURL" -}}
https://{{ include "costwarden.ingestServiceName" . }}.{{ .Release.Namespace }}.svc:{{ .Values.operator.ports.ingest }}
{{- end }}

{{- define "costwarden.ingestCAName" -}}
{{- printf "%s-ingest-ca" (include "costwarden.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "costwarden.webhookServiceName" -}}
{{- printf "%s-webhook" (include "costwarden.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Whether the ServiceMonitors render: asked for, and the API exists or rendering is forced. */}}
{{- define "costwarden.serviceMonitor.render" -}}
{{- if and .Values.metrics.serviceMonitor.enabled (or .Values.metrics.serviceMonitor.force (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor")) }}true{{- end }}
{{- end }}
