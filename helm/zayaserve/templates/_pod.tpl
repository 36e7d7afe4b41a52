{{/*
The pod templates of the Ray head and the two worker groups. Every Ray container gets the same
image, environment (secrets as env), the model and API-key mounts, and a memory-backed /dev/shm.
*/}}

{{/* The model's mount point: the parent folder of model.path (pvc and hostPath only). */}}
{{- define "zayaserve.modelMountPath" -}}
{{- dir .Values.model.path -}}
{{- end -}}

{{- define "zayaserve.rayEnv" -}}
{{- if include "zayaserve.redis.url" . }}
# The L2 prefix cache's HMAC key: one for every worker and rollout.
- name: ZAYASERVE_KV_CACHE_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "zayaserve.kvCacheSecret.name" . }}
      key: {{ include "zayaserve.kvCacheSecret.key" . }}
{{- end }}
# The expert shards' RPC token, kept across in-place Serve updates.
- name: ZAYASERVE_RPC_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "zayaserve.rpcTokenSecret.name" . }}
      key: {{ include "zayaserve.rpcTokenSecret.key" . }}
{{- with .Values.tracing }}
{{- if .otlpEndpoint }}
# OpenTelemetry traces: the Serve app (built on the head) and every process's exporter read
# the standard OTEL_* variables.
- name: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
  value: {{ .otlpEndpoint | quote }}
{{- end }}
{{- with .sampler }}
- name: OTEL_TRACES_SAMPLER
  value: {{ . | quote }}
{{- end }}
{{- if and (not (kindIs "invalid" .samplerArg)) (ne (toString .samplerArg) "") }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .samplerArg | toString | quote }}
{{- end }}
{{- with .serviceName }}
- name: OTEL_SERVICE_NAME
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "zayaserve.rayVolumeMounts" -}}
- name: shm
  mountPath: /dev/shm
{{- if ne .Values.model.source "image" }}
- name: model
  mountPath: {{ include "zayaserve.modelMountPath" . }}
  readOnly: true
{{- end }}
{{- if .Values.secrets.apiKeys.enabled }}
- name: api-keys
  mountPath: {{ include "zayaserve.apiKeysDir" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Call: include "zayaserve.rayVolumes" (list $ .shmSize) */}}
{{- define "zayaserve.rayVolumes" -}}
{{- $ctx := index . 0 -}}
# Ray's object store, in /dev/shm (a container runtime's default is 64Mi).
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ index . 1 }}
{{- if eq $ctx.Values.model.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ required "model.source is pvc: set model.pvc.claimName" $ctx.Values.model.pvc.claimName }}
    readOnly: true
{{- else if eq $ctx.Values.model.source "hostPath" }}
- name: model
  hostPath:
    path: {{ required "model.source is hostPath: set model.hostPath.path" $ctx.Values.model.hostPath.path }}
    type: Directory
{{- end }}
{{- if $ctx.Values.secrets.apiKeys.enabled }}
- name: api-keys
  secret:
    secretName: {{ include "zayaserve.apiKeysSecret.name" $ctx }}
    items:
      - key: {{ include "zayaserve.apiKeysSecret.key" $ctx }}
        path: {{ include "zayaserve.apiKeysSecret.key" $ctx }}
{{- end }}
{{- end -}}

{{/* requests == limits, as Ray recommends (it reads its CPU and memory from the limits). */}}
{{- define "zayaserve.cpuMemory" -}}
cpu: {{ .cpu | quote }}
memory: {{ .memory | quote }}
{{- end -}}

{{/*
The pod template of a worker group, "attention" or "experts".
Call: include "zayaserve.workerTemplate" (list $ "attention")
*/}}
{{- define "zayaserve.workerTemplate" -}}
{{- $ctx := index . 0 -}}
{{- $name := index . 1 -}}
{{- $group := get $ctx.Values $name -}}
{{- $gpu := include "zayaserve.gpuResource" $ctx -}}
{{- $hasGpus := and (ne $gpu "") (gt (int $group.gpusPerPod) 0) -}}
{{- /* The vendor's default nodeSelector applies to groups with GPUs; the group's keys win. */ -}}
{{- $vendorSelector := ternary (dig $ctx.Values.gpu.vendor "nodeSelector" dict $ctx.Values.gpu) dict $hasGpus -}}
{{- $nodeSelector := merge (deepCopy ($group.nodeSelector | default dict)) $vendorSelector -}}
metadata:
  labels:
    {{- include "zayaserve.componentLabels" (list $ctx $name) | nindent 4 }}
    {{- with $group.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $group.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with $ctx.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: ray-worker
      image: {{ include "zayaserve.image" $ctx }}
      imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
      env:
        {{- include "zayaserve.rayEnv" $ctx | trim | nindent 8 }}
      resources:
        requests:
          {{- include "zayaserve.cpuMemory" $group.resources | nindent 10 }}
          {{- if $hasGpus }}
          {{ $gpu }}: {{ $group.gpusPerPod | quote }}
          {{- end }}
        limits:
          {{- include "zayaserve.cpuMemory" $group.resources | nindent 10 }}
          {{- if $hasGpus }}
          {{ $gpu }}: {{ $group.gpusPerPod | quote }}
          {{- end }}
      volumeMounts:
        {{- include "zayaserve.rayVolumeMounts" $ctx | trim | nindent 8 }}
  volumes:
    {{- include "zayaserve.rayVolumes" (list $ctx $group.shmSize) | trim | nindent 4 }}
  {{- with $nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
