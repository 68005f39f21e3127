{{/*
Names, labels and checks shared by the templates.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "sinew.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The prefix of every resource name: fullnameOverride, else the release name when it already contains the chart name
(`helm install sinew ...` gives DaemonSet "sinew"), else "<release>-<chart>".
*/}}
{{- define "sinew.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "name-version" for the helm.sh/chart label. */}}
{{- define "sinew.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The labels that select the agent pods. They never change across upgrades (a DaemonSet selector is immutable). */}}
{{- define "sinew.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sinew.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The standard labels of every object of the release. */}}
{{- define "sinew.labels" -}}
{{ include "sinew.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sinew
helm.sh/chart: {{ include "sinew.chart" . }}
{{- end -}}

{{/* The agent image, with the tag defaulting to the chart's appVersion. */}}
{{- define "sinew.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The Secret with the mesh CA: ca.existingSecret, or the one the chart generates. */}}
{{- define "sinew.caSecretName" -}}
{{- if .Values.ca.existingSecret -}}
{{- .Values.ca.existingSecret -}}
{{- else -}}
{{- printf "%s-ca" (include "sinew.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The mesh root namespace: config.meshRootNamespace, else the release namespace. */}}
{{- define "sinew.meshRootNamespace" -}}
{{- default .Release.Namespace .Values.config.meshRootNamespace -}}
{{- end -}}

{{/*
Seconds in a duration the agent accepts (units d, h, m, s, largest first: "10s", "1m30s"). The input is checked by
values.schema.json and again here, since `helm template --skip-schema-validation` exists.
*/}}
{{- define "sinew.durationSeconds" -}}
{{- if or (eq . "") (not (regexMatch "^([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?$" .)) -}}
{{- fail (printf "%q is not a duration the agent accepts (units d, h, m, s, largest first, e.g. 10s or 1m30s)" .) -}}
{{- end -}}
{{- $total := 0 -}}
{{- range $part := regexFindAll "[0-9]+[dhms]" . -1 -}}
{{- $n := atoi (trimSuffix (regexFind "[dhms]$" $part) $part) -}}
{{- $unit := regexFind "[dhms]$" $part -}}
{{- if eq $unit "d" -}}
{{- $total = add $total (mul $n 86400) -}}
{{- else if eq $unit "h" -}}
{{- $total = add $total (mul $n 3600) -}}
{{- else if eq $unit "m" -}}
{{- $total = add $total (mul $n 60) -}}
{{- else -}}
{{- $total = add $total $n -}}
{{- end -}}
{{- end -}}
{{- $total -}}
{{- end -}}

{{/*
Checks that need more than the schema. Included by the DaemonSet, so `helm template` and `helm install` stop with
the message before anything is applied.
*/}}
{{- define "sinew.validate" -}}
{{- if .Values.config.proxy.enabled -}}
{{- $drain := include "sinew.durationSeconds" .Values.config.proxy.drainTimeout | atoi -}}
{{- if le (int .Values.terminationGracePeriodSeconds) $drain -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be longer than config.proxy.drainTimeout (%s = %d s): the kubelet would kill the agent while the proxy still drains connections" (int .Values.terminationGracePeriodSeconds) .Values.config.proxy.drainTimeout $drain) -}}
{{- end -}}
{{- if eq (int .Values.config.proxy.outboundPort) (int .Values.config.proxy.inboundPort) -}}
{{- fail "config.proxy.outboundPort and config.proxy.inboundPort must differ" -}}
{{- end -}}
{{- end -}}
{{- if not .Values.serviceAccount.create -}}
{{- if not .Values.serviceAccount.name -}}
{{- fail "serviceAccount.name is required when serviceAccount.create is false" -}}
{{- end -}}
{{- end -}}
{{- end -}}
