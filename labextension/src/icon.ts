import { LabIcon } from '@jupyterlab/ui-components';

// A lens over three text lines: "look into prompts". jp-icon3 lets the theme recolor it.
const svg = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <rect x="2" y="4" width="11" height="2" rx="1"/>
    <rect x="2" y="9" width="7" height="2" rx="1"/>
    <rect x="2" y="14" width="5" height="2" rx="1"/>
    <path d="M15.5 8a5.5 5.5 0 0 1 4.55 8.6l2.67 2.67a1 1 0 0 1-1.41 1.41l-2.67-2.67A5.5 5.5 0 1 1 15.5 8zm0 2a3.5 3.5 0 1 0 0 7 3.5 3.5 0 0 0 0-7z"/>
  </g>
</svg>`;

export const promptscopeIcon = new LabIcon({ name: 'promptscope:sessions', svgstr: svg });
