// The runner's side of a JavaScript action, written out so the action needs no npm packages:
// inputs from INPUT_* variables, workflow commands on stdout (::add-mask::, ::error::, ...),
// and the environment files ($GITHUB_ENV, $GITHUB_STATE, $GITHUB_OUTPUT), in the formats of
// GitHub's "Workflow commands for GitHub Actions" reference.
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const os = require('node:os');

class Failure extends Error {}

// A workflow command's data is one line: the runner decodes %25, %0D and %0A back.
function escapeData(text) {
  return String(text).replace(/%/g, '%25').replace(/\r/g, '%0D').replace(/\n/g, '%0A');
}

function command(name, message) {
  process.stdout.write(`::${name}::${escapeData(message)}${os.EOL}`);
}

function info(message) {
  process.stdout.write(`${message}${os.EOL}`);
}

// SECURITY: from this line on the runner replaces the value with *** in the job's log.
function mask(secret) {
  command('add-mask', secret);
}

function error(message) {
  command('error', message);
}

function warning(message) {
  command('warning', message);
}

function notice(message) {
  command('notice', message);
}

// `with: name: value` arrives as INPUT_NAME (upper case, spaces as _, hyphens kept).
function input(env, name) {
  return (env[`INPUT_${name.replace(/ /g, '_').toUpperCase()}`] || '').trim();
}

// The YAML 1.2 core schema's booleans, as GitHub's own toolkit accepts them.
function booleanInput(env, name, fallback) {
  const text = input(env, name);
  if (text === '') return fallback;
  if (['true', 'True', 'TRUE'].includes(text)) return true;
  if (['false', 'False', 'FALSE'].includes(text)) return false;
  throw new Failure(`input ${name}: "${text}" is neither true nor false`);
}

// One entry of an environment file: `name=value`, or for a value with a line break
// `name<<DELIMITER`, the value, `DELIMITER`, with a delimiter the value cannot contain.
function fileCommand(env, file, name, value) {
  const path = env[file];
  if (!path) throw new Failure(`${file} is not set: this runs only as a step of a GitHub Actions job`);
  if (!name || /[=\r\n]/.test(name) || name.includes('<<')) throw new Failure(`bad ${file} name: ${name}`);
  const text = String(value);
  let entry;
  if (!/[\r\n]/.test(text)) {
    entry = `${name}=${text}${os.EOL}`;
  } else {
    const delimiter = `ghadelimiter_${crypto.randomUUID()}`;
    if (text.includes(delimiter)) throw new Failure(`the value of ${name} holds its own delimiter`);
    entry = `${name}<<${delimiter}${os.EOL}${text}${os.EOL}${delimiter}${os.EOL}`;
  }
  fs.appendFileSync(path, entry, { encoding: 'utf8' });
}

const exportVariable = (env, name, value) => fileCommand(env, 'GITHUB_ENV', name, value);
const saveState = (env, name, value) => fileCommand(env, 'GITHUB_STATE', name, value);
const setOutput = (env, name, value) => fileCommand(env, 'GITHUB_OUTPUT', name, value);

// What the post step sees of saveState: STATE_<name>.
function state(env, name) {
  return env[`STATE_${name}`] || '';
}

module.exports = {
  Failure, escapeData, info, mask, error, warning, notice, input, booleanInput,
  fileCommand, exportVariable, saveState, setOutput, state,
};
